"""Qwen v1 (model_type "qwen", QWenLMHeadModel) -> transformers' native Qwen2 layout.

The two networks are the same function; only names and a few config fields differ:
- `transformer.` -> `model.`, `h.{i}` -> `layers.{i}`; wte/ln_f/ln_1/ln_2 -> embed_tokens/norm/
  input_layernorm/post_attention_layernorm; lm_head stays (untied);
- fused `attn.c_attn` ([3H, H] + bias [3H]) splits into q/k/v_proj in that order; `attn.c_proj`
  -> o_proj; v1 computes `c_proj(w1(x) * silu(w2(x)))`, so w2 -> gate_proj, w1 -> up_proj,
  mlp.c_proj -> down_proj; rotary `inv_freq` buffers are dropped;
- GPTQ tensors (qweight/qzeros/scales/g_idx) are renamed the same way; for c_attn the q/k/v
  split is along the output features (dim 1 of qweight, qzeros and scales), g_idx is shared;
- config: intermediate_size / 2 (v1 stores the width of both branches), num_key_value_heads =
  num_attention_heads, rotary_emb_base -> rope_theta, layer_norm_epsilon -> rms_norm_eps,
  seq_length -> max_position_embeddings, silu, untied embeddings.

Inference beyond `seq_length`: v1's remote code switches on dynamic-NTK rotary scaling and
log-n attention scaling past `seq_length` (both off in training and within the window). The
native model uses plain RoPE, so within `seq_length` outputs are identical; beyond it they differ
(set a `rope_scaling` in config.json yourself if you need long inputs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from qwen_ft.errors import QwenFtError

LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
RENAMES = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.w2": "mlp.gate_proj",
    "mlp.w1": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
TOP = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias", "weight")


def is_qwen_v1(config: dict) -> bool:
    """Qwen v1 by config.json: model_type "qwen" or a QWenLMHeadModel architecture."""
    return config.get("model_type") == "qwen" or "QWenLMHeadModel" in (config.get("architectures") or [])


def native_config(v1: dict) -> dict:
    """The Qwen2 config.json for a v1 config.json.

    Raises:
        QwenFtError: settings the native architecture cannot express.
    """
    heads, hidden = v1["num_attention_heads"], v1["hidden_size"]
    problems = []
    if v1.get("kv_channels", hidden // heads) * heads != hidden:
        problems.append(f"kv_channels {v1.get('kv_channels')} x {heads} heads != hidden_size {hidden}")
    if float(v1.get("rotary_pct", 1.0)) != 1.0:
        problems.append(f"rotary_pct {v1.get('rotary_pct')} (only full-head rotary maps onto Qwen2)")
    if problems:
        raise QwenFtError("cannot convert this Qwen v1 config: " + "; ".join(problems))
    dtype = "bfloat16" if v1.get("bf16") else "float16" if v1.get("fp16") else v1.get("torch_dtype", "float32")
    out = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": v1["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": v1["intermediate_size"] // 2,
        "num_hidden_layers": v1["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "hidden_act": "silu",
        "max_position_embeddings": v1.get("seq_length", v1.get("max_position_embeddings")),
        "rms_norm_eps": v1.get("layer_norm_epsilon", 1e-6),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(v1.get("rotary_emb_base", 10000))},
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "dtype": dtype,
    }
    if v1.get("quantization_config"):
        out["quantization_config"] = v1["quantization_config"]
    return out


def native_name(name: str) -> str:
    """The Qwen2 name of a non-fused v1 tensor (c_attn is handled by `map_tensor`).

    Raises:
        QwenFtError: a tensor name outside the v1 layout (never dropped silently).
    """
    if name in TOP:
        return TOP[name]
    m = LAYER.match(name)
    if m:
        module, _, part = m.group(2).rpartition(".")
        if module in RENAMES and part in GPTQ_PARTS:
            return f"model.layers.{m.group(1)}.{RENAMES[module]}.{part}"
    raise QwenFtError(f"unexpected tensor {name!r} in a Qwen v1 checkpoint; conversion stopped")


def split_c_attn(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fused c_attn tensor -> q/k/v_proj tensors (dense: dim 0; GPTQ packed tensors: dim 1)."""
    m = LAYER.match(name)
    if m is None:
        raise QwenFtError(f"{name}: not a layer tensor of a Qwen v1 checkpoint; conversion stopped")
    part = name.rsplit(".", 1)[1]
    prefix = f"model.layers.{m.group(1)}.self_attn"
    if part == "g_idx":  # one input-channel grouping shared by q, k and v
        return {f"{prefix}.{p}_proj.g_idx": tensor.clone() for p in "qkv"}
    dim = 1 if part in ("qweight", "qzeros", "scales") else 0
    if tensor.shape[dim] % 3:
        raise QwenFtError(f"{name}: size {tensor.shape[dim]} along dim {dim} is not divisible into q, k, v")
    return {f"{prefix}.{p}_proj.{part}": t.contiguous() for p, t in zip("qkv", tensor.chunk(3, dim=dim), strict=True)}


def map_tensor(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Native tensors for one v1 tensor ({} for dropped rotary buffers)."""
    if name.endswith("rotary_emb.inv_freq"):
        return {}
    if ".attn.c_attn." in name:
        return split_c_attn(name, tensor)
    return {native_name(name): tensor}


def read_v1_config(path: str | Path) -> dict:
    """config.json of a v1 checkpoint, with its GPTQ settings from quantize_config.json when stored there."""
    root = Path(path)
    config = json.loads((root / "config.json").read_text())
    if not config.get("quantization_config") and (root / "quantize_config.json").is_file():
        config["quantization_config"] = {
            "quant_method": "gptq",
            **json.loads((root / "quantize_config.json").read_text()),
        }
    return config


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Dense floating tensors take `dtype`; GPTQ tensors (packed ints, scales) keep their own."""
    gptq = name.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() and not gptq else tensor


def _write_weights(src: Path, out: Path, dtype: torch.dtype | None) -> None:
    """Map every v1 shard into a native shard of the same name (one shard in memory at a time)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        found = "pickle .bin weights" if list(src.glob("*.bin")) else "no weights"
        raise QwenFtError(f"{src}: {found}; qwen-ft reads safetensors only (never unpickles checkpoint files)")
    index = {}
    for f in files:
        tensors = {}
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                for name, t in map_tensor(key, fh.get_tensor(key)).items():
                    tensors[name] = _cast(name, t, dtype)
        save_file(tensors, str(out / f.name), metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, f.name))
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: str = "auto") -> Path:
    """Write the native Qwen2 checkpoint of v1 checkpoint `src` into `dst` (atomically).

    Args:
        src: v1 checkpoint directory (config.json, *.safetensors, qwen.tiktoken).
        dst: output directory.
        dtype: auto (the checkpoint's), bf16, fp16 or fp32 for dense weights; GPTQ stays GPTQ.

    Raises:
        QwenFtError: not a v1 checkpoint, pickle-only weights, or an unexpected tensor.
    """
    from qwen_ft.files import atomic_dir
    from qwen_ft.model.generation import write_generation_config
    from qwen_ft.tokenizer.convert import convert_tiktoken
    from qwen_ft.tokenizer.tiktoken_qwen import QwenV1Tokenizer

    src, out = Path(src), Path(dst)
    v1 = read_v1_config(src)
    if not is_qwen_v1(v1):
        raise QwenFtError(f"{src}/config.json is not a Qwen v1 checkpoint (model_type {v1.get('model_type')!r})")
    tok = QwenV1Tokenizer(src / "qwen.tiktoken")
    # As v1's own config: <|endoftext|> ends text; generation_config.json adds <|im_end|> for chat.
    config = {**native_config(v1), **tok.special_ids(), "eos_token_id": tok.endoftext_id}
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    if dtype != "auto" and "quantization_config" not in config:
        config["dtype"] = names[dtype]
    with atomic_dir(out) as tmp:
        _write_weights(src, tmp, None if "quantization_config" in config else getattr(torch, config["dtype"]))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_generation_config(src, tok, tmp)
        convert_tiktoken(src / "qwen.tiktoken", tmp)
        (tmp / "converted_from.json").write_text(json.dumps({"source": str(src.resolve()), "format": "qwen-v1"}))
    return out


def converted_for_training(src: str | Path, cache_root: str | Path) -> Path:
    """The native conversion of `src` in the cache (made once, keyed by the checkpoint's fingerprint)."""
    from qwen_ft.model.fingerprint import model_fingerprint

    target = Path(cache_root) / "converted" / f"qwen-v1-{model_fingerprint(src)}"
    if not (target / "converted_from.json").is_file():
        convert_checkpoint(src, target)
    return target
