"""DeepSpeed engine creation and ZeRO-3 weight gathering (deepspeed imported lazily, required via deps)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from qwen_ft import deps
from qwen_ft.train.ds_config import offloads_optimizer, zero_stage

if TYPE_CHECKING:
    from qwen_ft.config.schema import RunConfig


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


def initialize(cfg: RunConfig, model, ds_config: dict):
    """deepspeed.initialize with qwen-ft's AdamW (DeepSpeedCPUAdam when the optimizer is offloaded).

    No DeepSpeed scheduler is created: the loop sets the learning rate of every step itself.
    """
    deepspeed = import_deepspeed()
    from qwen_ft.train.schedule import build_optimizer

    optimizer = build_optimizer(model, cfg, cpu_offload=offloads_optimizer(ds_config))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return engine


def gathered_state_dict(engine, model, method: str) -> dict | None:
    """Full tensors of what must be saved, on the main process (None when ZeRO keeps whole parameters).

    Every rank must call this (it gathers). Full fine-tuning gathers the consolidated model;
    adapters gather only the trainable tensors.
    """
    if zero_stage(engine.config) != 3:
        return None
    if method == "full":
        return engine._zero3_consolidated_16bit_state_dict()
    deepspeed = import_deepspeed()
    # state_dict keys, not named_parameters: tied copies (peft's tied lm_head) share one Parameter
    # but must each appear under their own key.
    wanted = {k: p for k, p in model.state_dict(keep_vars=True).items()
              if isinstance(p, torch.nn.Parameter) and p.requires_grad}
    unique = list({id(p): p for p in wanted.values()}.values())
    with deepspeed.zero.GatheredParameters(unique, modifier_rank=None):
        return {k: p.detach().cpu().clone() for k, p in wanted.items()}
