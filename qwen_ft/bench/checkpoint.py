"""Random-weight checkpoints of a named shape, written tensor by tensor (no model is instantiated).

Speed and memory do not depend on the values, so weights are N(0, 0.02), norms 1, biases 0. The GPTQ
variant stores the decoder's linear layers packed as 4-bit GPTQ (v1 format: qweight, qzeros,
scales, g_idx) with small scales, so activations stay finite; it loads through transformers +
gptqmodel like a real Int4 checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwen_ft.bench.shapes import shape_config
from qwen_ft.model.shape import Shape
from qwen_ft.tokenizer import load_tokenizer
from qwen_ft.tokenizer.bundled import write_tokenizer_files

SHARD_BYTES = 4 * 1024**3


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a checkpoint with this config.json, from a meta-device model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in config.items() if k != "model_type"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **settings))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _dense(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, device) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype).cpu()


def _gptq(shape: tuple[int, ...], group: int, gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Packed 4-bit tensors of one linear layer (weight shape (out, in))."""
    out_f, in_f = shape
    ints = torch.randint(-(2**31), 2**31 - 1, (in_f // 8, out_f), generator=gen, device=device, dtype=torch.int64)
    zeros = torch.full((in_f // group, out_f // 8), 0x77777777, dtype=torch.int64)  # zero point 8 (stored - 1)
    scales = torch.full((in_f // group, out_f), 0.02 / 8, dtype=torch.float16)
    return {
        "qweight": ints.to(torch.int32).cpu(),
        "qzeros": zeros.to(torch.int32),
        "scales": scales,
        "g_idx": (torch.arange(in_f, dtype=torch.int32) // group),
    }


def _tensors(config: dict, dtype: torch.dtype, gptq_group: int | None, device):
    """Yield (name, tensor) of the whole checkpoint, one layer tensor at a time."""
    gen = torch.Generator(device=device).manual_seed(0)
    linears = Shape.from_config(config).linear_shapes()
    for name, shape in tensor_shapes(config).items():
        module = name.rsplit(".", 2)
        if gptq_group and name.endswith(".weight") and module[-2] in linears:
            for suffix, t in _gptq(shape, gptq_group, gen, device).items():
                yield f"{module[0]}.{module[1]}.{suffix}", t
        else:
            yield name, _dense(name, shape, torch.float16 if gptq_group else dtype, gen, device)


def _write_shards(items, out: Path) -> None:
    """safetensors shards of at most SHARD_BYTES plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in items:
        if current and size + t.numel() * t.element_size() > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t.contiguous(), size + t.numel() * t.element_size()
    shards.append(current)
    index = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))


def gptq_group_size(config: dict) -> int:
    """128 (Qwen's Int4 releases) when every input width allows it, else 32 (tiny shapes)."""
    return 128 if config["hidden_size"] % 128 == 0 and config["intermediate_size"] % 128 == 0 else 32


def write_random_checkpoint(
    shape: str, out: str | Path, dtype: torch.dtype = torch.bfloat16, gptq: bool = False
) -> Path:
    """Write config.json, random weights and the bundled Qwen tokenizer files to `out`; returns it."""
    config = shape_config(shape)
    vocabulary = "qwen3_5" if config["model_type"] == "qwen3_5_text" else "qwen3"
    out = write_tokenizer_files(vocabulary, out)  # a Path from here on (`out` may be given as a str)
    config.update(load_tokenizer(out).special_ids())
    group = gptq_group_size(config) if gptq else None
    if group:
        config["quantization_config"] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group,
            "desc_act": False,
            "sym": True,
            "checkpoint_format": "gptq",
            "pack_dtype": "int32",
        }
        config["torch_dtype"] = "float16"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _write_shards(_tensors(config, dtype, group, device), out)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return Path(out)
