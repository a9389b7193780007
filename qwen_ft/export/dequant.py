"""GPTQ checkpoint -> dense model: every quantized linear replaced by nn.Linear holding its dequantized weight.

The dense weight comes from the quantized module's own `dequantize_weight()`, i.e. exactly the
matrix its forward multiplies by, so a LoRA adapter trained on the GPTQ base sees the same
base function after dequantization.
"""

from __future__ import annotations

import torch

from qwen_ft import deps


def _is_quant_linear(module) -> bool:
    return hasattr(module, "qweight") and hasattr(module, "dequantize_weight")


def dense_weight(module) -> torch.Tensor:
    """[out_features, in_features] weight that the quantized `module` applies."""
    w = module.dequantize_weight()
    if tuple(w.shape) == (module.in_features, module.out_features):  # gptqmodel returns [in, out]
        w = w.t()
    return w.contiguous()


def load_gptq_model(path: str, dtype: torch.dtype = torch.float32):
    """Load a GPTQ checkpoint through transformers with the torch kernel (CPU-capable); a mixture of
    experts' routed experts, which transformers cannot load from their per-expert quantized linears, hold
    those dequantized (model/gptq_experts.py)."""
    deps.require("gptq", "merging into a GPTQ base")
    from qwen_ft.model.experts import expert_modules
    from qwen_ft.model.gptq_experts import fill_dequantized
    from qwen_ft.model.quant import from_gptq_checkpoint, gptq_settings

    settings = gptq_settings(path) or {}
    model = from_gptq_checkpoint(path, int(settings.get("bits", 4)), dtype, {"": "cpu"})
    fill_dequantized(model, expert_modules(model), path, settings)
    return model


def dequantize_to_dense(path: str, dtype: torch.dtype = torch.float32):
    """A plain transformers model (no quantization config) whose linears hold the GPTQ checkpoint's
    dequantized weights; every other tensor is copied as is.

    Raises:
        QwenFtError: the dense model does not receive every tensor.
    """
    from transformers import AutoModelForCausalLM

    from qwen_ft.errors import QwenFtError

    quantized = load_gptq_model(path, dtype)
    state, covered = {}, []
    for name, module in quantized.named_modules():
        if _is_quant_linear(module):
            covered.append(name + ".")
            state[name + ".weight"] = dense_weight(module).to(dtype)
            if getattr(module, "bias", None) is not None:
                state[name + ".bias"] = module.bias.detach().to(dtype)
    for key, value in quantized.state_dict().items():
        if not key.startswith(tuple(covered)):
            state[key] = value.to(dtype) if value.is_floating_point() else value
    config = quantized.config
    del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = dense.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise QwenFtError(
            f"{path}: dequantized tensors do not fit the architecture "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})"
        )
    if tied:
        dense.tie_weights()
    return dense.eval()
