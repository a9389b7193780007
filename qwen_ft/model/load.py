"""Load a local base checkpoint: dtype, attention implementation, gradient checkpointing.

Nothing here reaches a model hub: paths are local directories (`local_files_only=True`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from qwen_ft import deps
from qwen_ft.errors import QwenFtError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """Weights dtype of the frozen base and the autocast dtype of the forward pass."""

    name: str
    dtype: torch.dtype


def resolve_dtype(name: str, device: torch.device) -> Precision:
    """`auto` -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU; explicit values checked.

    Raises:
        QwenFtError: a dtype this device cannot train in.
    """
    cuda = device.type == "cuda"
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if name == "auto":
        name = "bf16" if bf16_ok else "fp16" if cuda else "fp32"
    if name == "fp16" and not cuda:
        raise QwenFtError(
            "model.dtype=fp16 on CPU: CPU kernels and loss scaling for fp16 are not supported; "
            "use model.dtype=fp32 (or auto)"
        )
    if name == "bf16" and cuda and not bf16_ok:
        raise QwenFtError("model.dtype=bf16 but this GPU has no bf16 support; use model.dtype=fp16 (or auto)")
    return Precision(name, DTYPES[name])


def resolve_attention(name: str, device: torch.device, dtype: str = "bf16") -> str:
    """`auto` -> the fastest exact kernel here; explicit values checked.

    On a GPU training in bf16/fp16: flash-attn when its compiled extension imports, else torch's
    own varlen flash attention (`varlen`), else sdpa. In fp32 (flash kernels are half precision
    only) and on a CPU: sdpa.

    Raises:
        QwenFtError: flash-attention requested where it cannot run.
    """
    from qwen_ft.model.attention import VARLEN, torch_varlen_available

    if name == "auto":
        if device.type != "cuda" or dtype == "fp32":
            return "sdpa"
        if deps.usable("flash_attn"):
            return "flash_attention_2"
        return VARLEN if torch_varlen_available(device) else "sdpa"
    if name in ("flash_attention_2", VARLEN) and device.type == "cuda" and dtype == "fp32":
        raise QwenFtError(
            f"model.attn_implementation={name} runs in bf16/fp16 only, and model.dtype is fp32; "
            "use model.dtype=bf16 (or auto), or model.attn_implementation=sdpa"
        )
    if name == "flash_attention_2":
        if device.type != "cuda":
            raise QwenFtError("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa (or auto)")
        deps.require("flash_attn", "model.attn_implementation=flash_attention_2")
    if name == VARLEN and device.type == "cuda" and not torch_varlen_available(device):
        raise QwenFtError(
            f"model.attn_implementation=varlen needs torch.nn.attention.varlen (torch 2.11 has it) "
            f"and an Ampere or newer GPU; this is torch {torch.__version__} on "
            f"{torch.cuda.get_device_name(device)}. Use sdpa (or auto)"
        )
    return name


def load_base_model(path: str, weights_dtype: torch.dtype, attn: str, trust_remote_code: bool):
    """The checkpoint in a local directory, whole (its family's class), with the given dtype and attention."""
    from qwen_ft.model.families import model_class

    model = model_class(path).from_pretrained(
        path,
        dtype=weights_dtype,
        attn_implementation=attn,
        trust_remote_code=trust_remote_code,
        local_files_only=True,
    )
    keep_applied_conversions(model, path)
    return model


def keep_applied_conversions(model, path: str) -> None:
    """Leave on the model only the weight renamings its load really applied, as a plain load records.

    transformers' ZeRO-3 load records every candidate renaming of the model type (legacy ones too),
    and save_pretrained reverses them all: a composite Qwen3.5 model, whose names already equal its
    checkpoint's, was saved as model.language_model.model.language_model.*. A renaming applied when
    some checkpoint name was not a model name and became one; tensor converters are kept as they are."""
    from transformers.core_model_loading import WeightRenaming

    from qwen_ft.model.layout import tensor_files

    recorded = getattr(model, "_weight_conversions", None)
    if not recorded:
        return
    ours, on_disk = set(model.state_dict()), set(tensor_files(path))

    def applied(rename) -> bool:
        pairs = list(zip(rename.source_patterns, rename.target_patterns, strict=False))
        return any(name not in ours and any(re.sub(s, t, name) in ours for s, t in pairs) for name in on_disk)

    model._weight_conversions = [c for c in recorded if not isinstance(c, WeightRenaming) or applied(c)]


def enable_gradient_checkpointing(model, for_adapters: bool, fraction: float = 1.0) -> None:
    """Non-reentrant checkpointing of the first `fraction` of decoder layers; with frozen embeddings
    (LoRA) the inputs must require grad.

    Layers left out keep their activations: each saves one recomputed forward per step, at the
    memory of a full layer's activations (`qwen-ft estimate`).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = decoder_layers(model)
    keep = checkpointed_layers(len(layers), fraction)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < keep
    if for_adapters:
        model.enable_input_require_grads()
    model.config.use_cache = False


def decoder_layers(model) -> list:
    """The language model's decoder layers, in order: a composite checkpoint's vision blocks (also
    transformers checkpointing layers, and first in module order) are never run in text training."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    root = base.get_decoder() if hasattr(base, "get_decoder") else base  # code loaded with trust_remote_code
    return [m for m in root.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpointed_layers(n_layers: int, fraction: float) -> int:
    """How many of `n_layers` decoder layers are recomputed (at least one when fraction > 0)."""
    return max(1, round(fraction * n_layers)) if fraction > 0 else 0
