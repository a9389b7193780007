"""DeepSpeed engine creation and ZeRO-3 weight gathering (deepspeed imported lazily, required via deps)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from qwen_ft import deps
from qwen_ft.train.ds_config import offloads_optimizer, zero_stage

if TYPE_CHECKING:
    from qwen_ft.config.schema import TrainConfig


def import_deepspeed():
    """Import DeepSpeed for this machine and bind its comm layer to the running process group.

    Call before anything else imports deepspeed (transformers' ZeRO-3 loading does): the
    accelerator is chosen at first import.
    """
    deps.require("deepspeed", "dist.deepspeed")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # gloo + CPU ops instead of probing for CUDA
    import deepspeed

    if torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    return deepspeed


def initialize(train: TrainConfig, model, ds_config: dict):
    """deepspeed.initialize with qwen-ft's AdamW (DeepSpeedCPUAdam when the optimizer is offloaded).

    No DeepSpeed scheduler is created: the loop sets the learning rate of every step itself.
    """
    deepspeed = import_deepspeed()
    from qwen_ft.train.schedule import build_optimizer

    optimizer = build_optimizer(model, train, cpu_offload=offloads_optimizer(ds_config))
    if zero_stage(ds_config) == 3:
        moe_blocks_whole(deepspeed, model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return engine


def moe_blocks_whole(deepspeed, model) -> None:
    """ZeRO-3 fetches each sparse-MoE block's parameters whole (DeepSpeed's leaf modules, as it
    recommends for mixtures of experts; see `z3_leaf_classes`)."""
    from qwen_ft.model.experts import z3_leaf_classes

    classes = z3_leaf_classes(model)
    if classes:
        deepspeed.utils.set_z3_leaf_modules(model, classes)


def _gathered_by_module(deepspeed, model) -> dict:
    """Every tensor under the model's own state_dict keys, gathered one module at a time (rank 0 keeps
    host copies). DeepSpeed's consolidated state dict names tensors by walking children itself, and for
    a composite Qwen3.5 model those names come out doubled (model.language_model.model.language_model...)."""
    import torch.distributed as dist

    keep = not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    gathered: dict[int, str] = {}  # id(parameter) -> its key in `out`
    for prefix, module in model.named_modules():
        # a tied parameter once: its other keys share that one tensor, so save_pretrained sees the tie
        params = [(n, p) for n, p in module.named_parameters(prefix=prefix, recurse=False) if id(p) not in gathered]
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if keep:
                out.update({name: p.detach().cpu().clone() for name, p in params})
            gathered.update({id(p): name for name, p in params})
    if not keep:
        return out
    for key, value in model.state_dict(keep_vars=True).items():  # tied keys and (never partitioned) buffers
        if key not in out:
            out[key] = out[gathered[id(value)]] if id(value) in gathered else value.detach().cpu()
    return out


def gathered_state_dict(engine, model, method: str) -> dict | None:
    """Full tensors of what must be saved, on the main process (None when ZeRO keeps whole parameters).

    Every rank must call this (it gathers). Full fine-tuning gathers the consolidated model;
    adapters gather only the trainable tensors.
    """
    if zero_stage(engine.config) != 3:
        return None
    deepspeed = import_deepspeed()
    if method == "full":
        return _gathered_by_module(deepspeed, model)
    # state_dict keys, not named_parameters: tied copies (peft's tied lm_head) share one Parameter
    # but must each appear under their own key.
    wanted = {
        k: p
        for k, p in model.state_dict(keep_vars=True).items()
        if isinstance(p, torch.nn.Parameter) and p.requires_grad
    }
    unique = list({id(p): p for p in wanted.values()}.values())
    with deepspeed.zero.GatheredParameters(unique, modifier_rank=None):
        return {k: p.detach().cpu().clone() for k, p in wanted.items()}
