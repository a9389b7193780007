"""Apply the training method: full (every parameter) or LoRA (peft) on top of the base."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qwen_ft.model.families import Family, under

if TYPE_CHECKING:
    from qwen_ft.config.schema import LoraSettings, MethodSpec


DEFAULT_DROPOUT = 0.05


def lora_config(lo: LoraSettings, family: Family):
    """peft LoraConfig from the run config and the family registry: module targets, and on a mixture of
    experts the fused experts as parameter targets (model/experts.py)."""
    from peft import LoraConfig

    from qwen_ft.model.experts import split_targets

    modules, parameters = split_targets(lo.target_modules, family)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lora_dropout(lo, family),
        target_modules=modules or None,
        target_parameters=parameters or None,
        use_rslora=lo.rslora,
        use_dora=lo.dora,
        modules_to_save=list(family.embedding_modules) if lo.train_embeddings else None,
        ensure_weight_tying=bool(lo.train_embeddings),
        exclude_modules=frozen_pattern(family),
    )


def lora_dropout(lora: LoraSettings, family: Family) -> float:
    """lora.dropout, or its default: 0.05, and 0 where parameters are adapted (peft's ParamWrapper
    takes no dropout; an explicit value > 0 there is refused by model/checks.py)."""
    from qwen_ft.model.experts import split_targets

    if lora.dropout is not None:
        return lora.dropout
    return 0.0 if split_targets(lora.target_modules, family)[1] else DEFAULT_DROPOUT


def frozen_pattern(family: Family) -> str | None:
    """A regex (peft matches it against whole module names) for the family's frozen towers, so no
    adapter lands there even when a target name also occurs in the vision tower."""
    if not family.frozen:
        return None
    import re

    return "|".join(rf"(.*\.)?{re.escape(prefix)}(\..*)?" for prefix in family.frozen)


def apply_method(model, method: MethodSpec, family: Family, seed: int):
    """Return the model to train: the base itself (full) or a PeftModel (lora).

    The adapters' initial values follow train.seed from here, whatever loading drew from the
    generator before (ZeRO-3's zero.Init builds Qwen3.5's layers for real, drawing their A_log init;
    a plain load builds them on the meta device and draws nothing)."""
    torch.manual_seed(seed)
    if method.name == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(not under(name, family.frozen))  # frozen towers stay out of the optimizer
        return model
    from peft import get_peft_model

    with gptq_dispatch_only_for_gptq(model):
        if method.adapter:
            from qwen_ft.model.start_adapter import load_start_adapter

            model = load_start_adapter(model, method.adapter, method.reference)
        else:
            model = get_peft_model(model, lora_config(method.lora, family))
    trainable_in_fp32(model)
    if family.moe:
        from qwen_ft.model.experts import install_lora_experts

        install_lora_experts(model)  # adapted experts run through the grouped matmuls, not per-expert weights
    return model


def gptq_dispatch_only_for_gptq(model):
    """peft imports gptqmodel for every LoRA layer whenever it is installed, to ask whether the layer is
    a GPTQ (or gptqmodel AWQ) one; importing it prints a banner and rewrites PYTORCH_ALLOC_CONF. A
    base without such weights cannot have such layers, so for it peft's dispatchers are told
    gptqmodel is absent."""
    import sys
    from contextlib import ExitStack
    from unittest import mock

    import peft.tuners.lora  # noqa: F401 - the dispatcher modules, loaded before they are patched

    stack = ExitStack()
    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)).lower() in ("gptq", "awq"):
        return stack
    for name, module in list(sys.modules.items()):
        if name.startswith("peft.") and hasattr(module, "is_gptqmodel_available"):
            stack.enter_context(mock.patch.object(module, "is_gptqmodel_available", lambda: False))
    return stack


def trainable_in_fp32(model) -> None:
    """Keep every trained tensor in fp32, whatever the frozen base's dtype.

    peft makes LoRA weights fp32 but copies `modules_to_save` (LoRA (emb)'s embeddings and output
    layer) in the base's dtype; AdamW updates of bf16 weights are mostly rounded away.
    """
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def lora_input_casting_off(model):
    """peft's `disable_input_dtype_casting` for a peft model; nothing for others."""
    from contextlib import nullcontext

    if not hasattr(model, "peft_config"):
        return nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (tied weights once; quantized weights by their logical size)."""
    from qwen_ft.model.experts_4bit import logical_numel
    from qwen_ft.model.gptq_experts import is_gptq

    seen: set[int] = set()
    trainable = total = 0
    for module in model.modules():
        packed = _gptq_weight(module) if not is_gptq(module) else module.qweight0
        if packed is not None and id(packed) not in seen:  # peft's wrapper exposes its base's qweight too
            seen.add(id(packed))
            total += _logical_size(module)
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = getattr(p, "ds_numel", None) or logical_numel(p)  # ZeRO-3 keeps only a shard locally
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _gptq_weight(module):
    """The packed weight of a GPTQ linear layer, else None: GPTQ keeps `qweight` as a buffer, whose numel
    says nothing about the layer's size (bnb's 4-bit parameters know their logical shape)."""
    if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
        return None
    return getattr(module, "qweight", None)


def _logical_size(module) -> int:
    """Weights a GPTQ linear layer (or a GPTQ base's stacked experts) holds packed in buffers."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features * module.out_features
    return module.shape.numel()  # model/gptq_experts.GPTQPacked
