"""GPTQ mixture-of-experts bases for Q-LoRA: the checkpoint's per-expert quantized linears, held stacked
in place of transformers' fused experts and dequantized per layer where they run.

A GPTQ MoE checkpoint (gptqmodel, Qwen3-30B-A3B-GPTQ-Int4) quantizes every routed expert as its own
linears (`mlp.experts.{i}.gate_proj` / `up_proj` / `down_proj`: qweight, qzeros, scales, g_idx).
transformers 5 fuses the experts into `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] and loads
those per-expert tensors into nothing (model/quant.py refuses such a load elsewhere). Here each
fused projection becomes a `GPTQPacked` module: the experts' packed tensors stacked along a leading
expert axis, kept packed, and dequantized with gptqmodel's own arithmetic (the v1 zero-point offset,
`scales[g] * (code - zero[g])`) into the fused layout when the layer runs. LoRA is peft's
per-expert adapter on the fused parameter (one rank-r pair per expert, as on a full-precision base),
so the adapter merges into the original base, or into these dequantized weights, in stock peft.

Only the packed layouts gptqmodel's torch kernel reads are accepted (GPTQ v1/v2, 2/4/8 bits, int32
words); anything else is refused naming what was found.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from qwen_ft.errors import QwenFtError

PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}  # fused <- per-expert linears
TENSORS = ("qweight", "qzeros", "scales", "g_idx")
# GPTQ v1 checkpoints store every zero point minus one; gptqmodel adds it back word-wise (carries included)
V1_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}
CHUNK = 16  # experts unpacked at once


class GPTQPacked(torch.nn.Module):
    """One fused projection of a layer's routed experts as GPTQ stores it: for each per-expert linear it
    is made of (gate and up, or down), qweight [E, in/pack, out], qzeros [E, groups, out/pack], scales
    [E, groups, out] and g_idx [E, in], stacked over the experts. `shape` is the fused parameter's."""

    def __init__(self, parts: list[dict[str, torch.Tensor]], bits: int, dtype: torch.dtype):
        super().__init__()
        self.bits, self.compute_dtype, self.n_parts = bits, dtype, len(parts)
        for i, part in enumerate(parts):
            for key in TENSORS:
                self.register_buffer(f"{key}{i}", part[key], persistent=False)
        first = parts[0]
        out = sum(int(p["scales"].shape[-1]) for p in parts)
        self.shape = torch.Size((first["g_idx"].shape[0], out, first["g_idx"].shape[1]))

    @property
    def device(self) -> torch.device:
        return self.get_buffer("qweight0").device

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The fused [E, out, in] weight the experts apply, in `dtype`. Unpacked CHUNK experts at a time:
        the int32 codes and gathered scales take several times the output's bytes while they live."""
        dense = torch.empty(self.shape, dtype=dtype, device=self.device)
        for start in range(0, self.shape[0], CHUNK):
            chunk = slice(start, start + CHUNK)
            parts = [_dequantize(*self._part(i, chunk), bits=self.bits) for i in range(self.n_parts)]
            dense[chunk] = torch.cat(parts, dim=-1).transpose(1, 2)
        return dense

    def _part(self, i: int, chunk: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, qzeros, scales, g_idx) of part `i`, experts `chunk`."""
        qweight, qzeros, scales, g_idx = (self.get_buffer(f"{k}{i}")[chunk] for k in TENSORS)
        return qweight, qzeros, scales, g_idx


def _dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> torch.Tensor:
    """[E, in, out] = scales[g_idx] * (code - zero[g_idx]), unpacked as gptqmodel's torch kernel does."""
    e, rows, out = qweight.shape
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32)
    mask = (1 << bits) - 1
    codes = torch.bitwise_right_shift(qweight.unsqueeze(2), shifts.view(1, 1, -1, 1)) & mask
    codes = codes.reshape(e, -1, out)[:, : g_idx.shape[1]]
    zeros = (torch.bitwise_right_shift(qzeros.unsqueeze(-1), shifts) & mask).reshape(e, qzeros.shape[1], -1)
    zeros = zeros[..., :out].to(scales.dtype)
    index = g_idx.long().unsqueeze(-1).expand(-1, -1, out)
    return scales.gather(1, index) * (codes.to(scales.dtype) - zeros.gather(1, index))


def is_gptq(weight: Any) -> bool:
    return isinstance(weight, GPTQPacked)


def bits_of(settings: dict) -> int:
    """The checkpoint's bit width, once its packed layout is one this module reads.

    Raises:
        QwenFtError: another bit width, word size or checkpoint format, named.
    """
    bits = int(settings.get("bits", 4))
    form = _format(settings)
    pack = str(settings.get("pack_dtype", "int32")).lower()
    if bits not in V1_OFFSET or form not in ("gptq", "gptq_v2") or pack != "int32":
        raise QwenFtError(
            f"GPTQ mixture of experts with bits={bits}, format={form!r}, pack_dtype={pack!r}: qwen-ft "
            "reads 2/4/8-bit GPTQ (v1 or v2) experts packed in int32 words; re-quantize with "
            "`qwen-ft quantize` or use quant.backend=bnb on the original-precision checkpoint"
        )
    return bits


def _format(settings: dict) -> str:
    """The checkpoint's GPTQ format, read as gptqmodel reads it (`format` first)."""
    return str(settings.get("format") or settings.get("checkpoint_format") or "gptq").lower()


def _check_rows(name: str, part: dict[str, torch.Tensor], bits: int) -> None:
    """Refuse experts packed at another bit width than the checkpoint's (gptqmodel's per-module `dynamic`
    overrides): their codes would be unpacked wrongly.

    Raises:
        QwenFtError: naming the linear and both widths.
    """
    rows, width = part["qweight"].shape[1], part["g_idx"].shape[1]
    if rows != -(-width * bits // 32):
        raise QwenFtError(
            f"{name}: {rows} packed rows for {width} inputs is not {bits}-bit GPTQ, the checkpoint's "
            "bits (a per-module `dynamic` override?); qwen-ft reads experts at the checkpoint's width "
            "only: use quant.backend=bnb on the original-precision checkpoint"
        )


def disk_prefix(module_name: str) -> str:
    """The checkpoint's name of an experts module (peft's `base_model.model.` and `base_layer` hops left out)."""
    name = module_name.removeprefix("base_model.model.")
    return re.sub(r"(\.base_layer)+", "", name)


def layout_problem(files: dict[str, Path], prefixes: Iterable[str], num_experts: int, where: str) -> str | None:
    """Why the checkpoint's routed experts under `prefixes` are not per-expert quantized linears, or None."""
    for prefix in prefixes:
        wanted = [
            f"{prefix}.{i}.{linear}.{key}"
            for i in range(num_experts)
            for linear in PARTS["gate_up_proj"] + PARTS["down_proj"]
            for key in TENSORS
        ]
        absent = [w for w in wanted if w not in files]
        if absent:
            found = sorted(n for n in files if n.startswith(prefix + "."))[:4] or ["nothing"]
            return (
                f"{where}: the routed experts of {prefix} are not quantized per expert ({absent[0]} is absent; "
                f"found {', '.join(found)}); qwen-ft trains GPTQ mixtures of experts whose every expert linear "
                "is GPTQ-quantized (as gptqmodel and `qwen-ft quantize` write them); use quant.backend=bnb on "
                "the original-precision checkpoint"
            )
    return None


def stacked(
    path: str | Path,
    prefix: str,
    num_experts: int,
    settings: dict,
    dtype: torch.dtype,
    files: dict[str, Path] | None = None,
) -> dict[str, GPTQPacked]:
    """{"gate_up_proj": ..., "down_proj": ...} for the experts module `prefix` of the checkpoint at `path`
    (tensors read one file handle at a time; v1 zero points converted as gptqmodel converts them)."""
    from safetensors import safe_open

    from qwen_ft.model.layout import tensor_files

    files = files or tensor_files(path)
    bits = bits_of(settings)
    v1 = _format(settings) == "gptq"
    handles: dict[Path, Any] = {}

    def read(name: str) -> torch.Tensor:
        if files[name] not in handles:
            handles[files[name]] = safe_open(str(files[name]), "pt")
        return handles[files[name]].get_tensor(name)

    fused = {}
    for projection, linears in PARTS.items():
        parts = []
        for linear in linears:
            part = {k: torch.stack([read(f"{prefix}.{i}.{linear}.{k}") for i in range(num_experts)]) for k in TENSORS}
            _check_rows(f"{prefix}.*.{linear}", part, bits)
            if v1:  # int32 words wrap on overflow, as gptqmodel's in-place add does
                part["qzeros"] = part["qzeros"] + torch.tensor(V1_OFFSET[bits], dtype=torch.int32)
            parts.append(part)
        fused[projection] = GPTQPacked(parts, bits, dtype)
    return fused


def attach(model: torch.nn.Module, experts: list, path: str | Path, settings: dict, dtype: torch.dtype) -> list[str]:
    """Replace the fused routed-experts parameters of the `experts` modules of `model` (after peft has
    wrapped them) by the GPTQ checkpoint's per-expert quantized linears, on the parameter's device;
    returns the names replaced.

    Raises:
        QwenFtError: the checkpoint's experts are not quantized per expert.
    """
    done = []
    for prefix, module, packed in _per_module(model, experts, path, settings, dtype):
        for projection, weights in packed.items():
            device = getattr(module, projection).device
            delattr(module, projection)
            setattr(module, projection, weights.to(device))
            done.append(f"{prefix}.{projection}")
    return done


def fill_dequantized(model: torch.nn.Module, experts: list, path: str | Path, settings: dict) -> int:
    """Fill the fused experts (the `experts` modules) of a transformers load of the GPTQ checkpoint at
    `path` (left at their random initialisation) with the per-expert weights dequantized, in the
    parameters' dtype; returns how many experts modules were filled.

    Raises:
        QwenFtError: the checkpoint's experts are not quantized per expert.
    """
    filled = 0
    with torch.no_grad():
        for _, module, packed in _per_module(model, experts, path, settings, torch.float32):
            for projection, weights in packed.items():
                target = getattr(module, projection)
                target.copy_(weights.dequantize(target.dtype))
            filled += 1
    return filled


def _per_module(model: torch.nn.Module, experts: list, path: str | Path, settings: dict, dtype: torch.dtype):
    """(checkpoint name, experts module, {projection: GPTQPacked}) for every experts module of `model`,
    one layer read at a time (the caller places each before the next is read)."""
    from qwen_ft.model.layout import tensor_files

    owners = {id(m) for m in experts}
    named = [(disk_prefix(n), m) for n, m in model.named_modules() if id(m) in owners]
    if not named:
        return
    files = tensor_files(path)
    problem = layout_problem(files, [p for p, _ in named], int(named[0][1].num_experts), str(path))
    if problem:
        raise QwenFtError(problem)
    for p, m in named:
        yield p, m, stacked(path, p, m.num_experts, settings, dtype, files)
