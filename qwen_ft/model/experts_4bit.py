"""4-bit routed experts for Q-LoRA on a mixture of experts (bitsandbytes).

bitsandbytes quantizes `nn.Linear` layers only, and transformers 5 fuses a layer's routed experts into
two 3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]): left alone they stay 16-bit,
over 90% of a 30B-A3B model's weights. qwen-ft quantizes each fused parameter with bitsandbytes' own
blockwise quantizer (`Params4bit`: the quant_type, double quantization and storage dtype of `quant.*`,
the code `Linear4bit` runs), after peft has wrapped them (peft sizes its per-expert adapters from the
parameter's 3-D shape, which the packed storage no longer has). The experts forward
(model/experts.py) dequantizes a layer's experts where it runs them, in the forward and again in the
backward (`_Dequantized`), so no 16-bit copy outlives the layer's matmul.

Loading still reads the experts in 16-bit before they are quantized here, one parameter at a time:
the peak while loading is the 16-bit checkpoint, the peak while training the 4-bit one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from qwen_ft.config.schema import QuantConfig

PROJECTIONS = ("gate_up_proj", "down_proj")


def is_4bit(weight: Any) -> bool:
    return type(weight).__name__ == "Params4bit"


def is_quantized(weight: Any) -> bool:
    """Experts kept packed (bitsandbytes 4-bit, or a GPTQ base's, model/gptq_experts.py): only qwen-ft's
    grouped forward can run them."""
    from qwen_ft.model.gptq_experts import is_gptq

    return is_4bit(weight) or is_gptq(weight)


def describe(weight: Any) -> str:
    """How the experts are stored, for the run's log ("" for plain weights)."""
    from qwen_ft.model.gptq_experts import is_gptq

    if is_gptq(weight):
        return f"{weight.bits}-bit GPTQ experts dequantized per layer"
    return "4-bit experts dequantized per layer" if is_4bit(weight) else ""


def weight_compute_dtype(weight: Any) -> torch.dtype:
    """The dtype a (possibly quantized) expert weight is used in."""
    if is_4bit(weight):
        return weight.quant_state.dtype
    return getattr(weight, "compute_dtype", None) or weight.dtype


def logical_numel(weight: Any) -> int:
    """Elements of the weight before packing (bitsandbytes packs two 4-bit values per byte)."""
    return weight.quant_state.shape.numel() if is_4bit(weight) and weight.quant_state else weight.numel()


def quantize(model: torch.nn.Module, experts: list, quant: QuantConfig, dtype: torch.dtype) -> list[str]:
    """Quantize the fused routed-experts parameters of the `experts` modules of `model` in place, on their
    device; returns the names quantized (peft's `base_layer` hops left out)."""
    import bitsandbytes as bnb

    owners = {id(m) for m in experts}
    done = []
    for name, module in model.named_modules():
        if id(module) not in owners:
            continue
        for projection in PROJECTIONS:
            weight = getattr(module, projection)
            if is_4bit(weight):
                continue
            packed: Any = bnb.nn.Params4bit(
                weight.data.to(dtype),
                requires_grad=False,
                quant_type=quant.quant_type,
                compress_statistics=quant.double_quant,
                quant_storage=dtype,
            )
            setattr(module, projection, packed.to(weight.device))  # .to() quantizes, on that device
            del weight
            done.append(f"{name.replace('.base_layer', '')}.{projection}")
    return done


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """transformers' grouped x·Wₑᵀ, the weight dequantized first when it is quantized."""
    from transformers.integrations.moe import _grouped_linear

    if not is_quantized(weight):
        return _grouped_linear(x, weight, offsets)
    return _Dequantized.apply(x, weight, offsets)


class _Dequantized(torch.autograd.Function):
    """x·Wₑᵀ with W dequantized in the forward and again in the backward (the base is frozen: only the
    input's gradient, grad·Wₑ, is needed), instead of keeping the 16-bit W for the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        from transformers.integrations.moe import _grouped_linear

        ctx.weight = weight
        ctx.save_for_backward(offsets)
        return _grouped_linear(x, _dequantize(weight, x.dtype), offsets)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        from transformers.integrations.moe import _grouped_linear

        (offsets,) = ctx.saved_tensors
        dense = _dequantize(ctx.weight, grad.dtype)  # [E, out, in]: grad [S, out] · Wₑ
        return _grouped_linear(grad, dense, offsets, is_transposed=True), None, None


def _dequantize(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    if not is_4bit(weight):
        return weight.dequantize(dtype)  # GPTQ experts
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
