"""Base checkpoint + method -> the model to train, on its device."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qwen_ft.errors import QwenFtError
from qwen_ft.model.adapters import apply_method
from qwen_ft.model.families import Family
from qwen_ft.model.load import Precision, enable_gradient_checkpointing, load_base_model

if TYPE_CHECKING:
    from qwen_ft.config.schema import MethodSpec, ModelConfig, QuantConfig


def build_model(
    base: ModelConfig,
    method: MethodSpec,
    family: Family,
    precision: Precision,
    attn: str,
    device: torch.device,
    *,
    packing: bool,
    seed: int,
):
    """Load the base and apply the method (adapters initialised from `seed`); `packing`: rows hold
    several conversations.

    Full fine-tuning keeps fp32 master weights (the forward runs under autocast); LoRA keeps the
    frozen base in the run's dtype and peft keeps the adapters in fp32.
    """
    from qwen_ft.model.attention import flattens, model_attn_name

    mixed = packing or flattens(attn)  # several conversations in one row reach the layers
    attn = model_attn_name(attn)
    if method.name == "qlora":
        from qwen_ft.model.quant import quantize_experts

        model = _quantized_base(base, method.quant, precision, attn, device)
        keep_packed_apart(model, family, mixed)
        model = quantize_experts(apply_method(model, method, family, seed), method.quant, base.path, precision)
        return _offload_inputs(model, base)
    weights = torch.float32 if method.name == "full" else precision.dtype
    model = _plain_base(base, family, weights, attn, mixed)
    if base.recomputed_fraction > 0:
        enable_gradient_checkpointing(model, method.name != "full", base.recomputed_fraction)
    model = apply_method(model, method, family, seed)
    if base.fused_lora:  # validated: method=lora, uncompiled, no ZeRO-3
        from qwen_ft.model.fused_lora import install_fused_lora

        install_fused_lora(model)
    if base.compile:
        compile_decoder_layers(model)
    return _offload_inputs(model, base).to(device)


def _offload_inputs(model, base: ModelConfig):
    """model.offload_checkpoint_inputs: the recomputed layers' inputs wait in host memory (validated: with
    gradient checkpointing, uncompiled)."""
    if base.offload_checkpoint_inputs:
        from qwen_ft.model.offload import offload_checkpoint_inputs

        offload_checkpoint_inputs(model)
    return model


def frozen_copy(
    base: ModelConfig, family: Family, precision: Precision, attn: str, device: torch.device, *, packing: bool
):
    """The base checkpoint once more, frozen in the compute dtype: a full fine-tune's preference reference
    (at the first step it computes what the trained model computes under autocast)."""
    from qwen_ft.model.attention import flattens, model_attn_name

    model = _plain_base(base, family, precision.dtype, model_attn_name(attn), packing or flattens(attn))
    model.requires_grad_(False)
    return model.eval().to(device)


def _plain_base(base: ModelConfig, family: Family, dtype: torch.dtype, attn: str, mixed: bool):
    """The unquantized checkpoint in `dtype` with transformers' `attn` kernel, ready for rows that hold several
    conversations (`mixed`): no KV cache, Gated DeltaNet layers restarting per example, experts never a loop."""
    model = load_base_model(base.path, dtype, attn, base.trust_remote_code)
    model.config.use_cache = False  # packed rows are exact only without the KV cache
    keep_packed_apart(model, family, mixed)
    if family.moe:
        from qwen_ft.model.experts import never_a_loop

        never_a_loop(model)
    return model


def compile_decoder_layers(model, backend: str | Callable = "inductor") -> int:
    """torch.compile every decoder layer in place; returns how many. A checkpointed layer is compiled with
    its checkpoint inside the graph (`_checkpointed_call`), whichever way transformers wraps it.

    The layers share one code object, so one compiled graph serves all of them (`backend`: the tests count
    the graphs' matmuls through their own).

    Raises:
        QwenFtError: the model has no transformers decoder layers to compile.
    """
    from qwen_ft.errors import QwenFtError
    from qwen_ft.model.load import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        raise QwenFtError(
            "model.compile: true but this model has no transformers decoder layers to compile "
            "(checkpoint code loaded with trust_remote_code?); set model.compile: false"
        )
    checkpointed = _compiled_checkpoint(backend)
    for layer in layers:  # every micro-batch has its own length: one symbolic-shape graph
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False  # transformers' own wrapper is replaced by the compiled one
            layer.checkpointed_in_graph = True  # still recomputed (bench/worker.py counts it for HFU)
            layer._compiled_call_impl = functools.partial(checkpointed, layer)
        else:
            layer.compile(backend=backend, dynamic=True)
    return len(layers)


@functools.cache
def _compiled_checkpoint(backend: str | Callable):
    """`_checkpointed_call` compiled. Traced whole, the checkpoint is the partitioner's: the backward pass
    recomputes only what it reads, where an eager checkpoint around a compiled layer (transformers before
    5.2x, or a graph break at its wrapper) reruns the whole compiled forward, down_proj included, whose
    output nothing reads (tests/integration/test_compile.py counts the matmuls). The side effect dynamo would
    otherwise break the graph at is transformers' kernel-hub context variable, set and reset around the
    layer's call: not replaying it in the recomputation changes nothing."""
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return torch.compile(_checkpointed_call, backend=backend, dynamic=True)


def _checkpointed_call(layer, *args, **kwargs):
    """The layer's call under a non-reentrant activation checkpoint (as transformers checkpoints it)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(layer._call_impl, *args, use_reentrant=False, **kwargs)


def _quantized_base(base: ModelConfig, quant: QuantConfig, precision: Precision, attn: str, device: torch.device):
    """The quantized base (placed on `device` while loading), prepared for k-bit training."""
    from qwen_ft.model.quant import load_bnb_base, load_gptq_base, prepare_for_kbit

    load = load_bnb_base if quant.backend == "bnb" else load_gptq_base
    return prepare_for_kbit(load(base, quant, precision, attn, device), base.recomputed_fraction)


def keep_packed_apart(model, family: Family, mixed: bool) -> None:
    """Family rule for packed rows beyond attention: Gated DeltaNet layers restart at each example.

    Raises:
        QwenFtError: packing on a model with linear-attention layers that qwen-ft cannot restart at
            each example (they would leak one conversation into the next).
    """
    if family.packing != "gdn" or not mixed:
        return
    from qwen_ft.model.linear_attention import install_packed_gdn

    kinds = getattr(model.config.get_text_config(), "layer_types", None) or []
    expected = sum(kind == "linear_attention" for kind in kinds)
    found = install_packed_gdn(model)
    if found != expected:
        raise QwenFtError(
            f"data.packing: true (or a flattening attention kernel), but only {found} of the {expected} "
            f"linear-attention layers of this {family.name} model are Gated DeltaNet layers qwen-ft can "
            "restart at each conversation; rows holding several conversations would leak between them. "
            "Set data.packing: false and model.attn_implementation: sdpa"
        )


def load_trained_weights(model, ckpt: Path, method: str) -> None:
    """Put the weights saved in checkpoint `ckpt` into `model` (built the same way).

    Raises:
        QwenFtError: the checkpoint does not hold weights for every trainable tensor.
    """
    from safetensors.torch import load_file

    if method != "full":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        unexpected_keys = getattr(result, "unexpected_keys", None)
        if unexpected_keys:
            raise QwenFtError(
                f"{ckpt}: adapter does not match this run's LoRA settings ({len(unexpected_keys)} unexpected tensors)"
            )
        return
    state = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        if f.name != "optimizer.safetensors" and not f.name.startswith("rng"):  # rng.safetensors, rng-rankN
            state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tensors the class itself skips on load (Qwen3.5's mtp.*, copied into outputs from the base)
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = [k for k in unexpected if not any(p.search(k) for p in ignored)]
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise QwenFtError(
            f"{ckpt}: weights do not match the model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
