"""Checkpoint tensors to GGUF tensors: names, the per-architecture rewrites llama.cpp expects, and types.

A generator of `(gguf_name, tensor)` pairs over the checkpoint, run twice by the writer: once on meta
tensors (shapes only, to write the header) and once on the real ones, one at a time, straight into the
file. What each architecture needs, as llama.cpp's own `convert_hf_to_gguf.py` writes it:

- every family: the language model only (a vision tower is a separate projector file); a composite
  checkpoint's `model.language_model.` names read as `model.`;
- mixtures of experts: the routed experts as one 3-D tensor per projection (per-expert tensors stacked,
  transformers 5's fused `gate_up_proj` split into gate and up);
- Gated DeltaNet families (Qwen3-Next, Qwen3.5/3.6): `A_log` stored as `-exp(A_log)`, RMSNorm weights as
  `1 + w` (these models' norms scale by `1 + w`; the GDN output norm is plain and stays), the conv kernel
  squeezed to 2-D, and the multi-token-prediction block as extra layers after the decoder;
- Qwen3-Next: its joint `in_proj_qkvz` regrouped into q|k|v rows and a separate z (gate) tensor;
- Qwen3.5/3.6: value heads reordered from grouped-by-key-head to tiled, so ggml broadcasts key heads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# MTP tensors named at the top of the multi-token-prediction block, as llama.cpp's nextn layer names them
MTP_TOP = {
    "fc": "eh_proj",
    "pre_fc_norm_embedding": "enorm",
    "pre_fc_norm_hidden": "hnorm",
    "norm": "shared_head.norm",
}
# llama.cpp's names for the nextn tensors, which gguf 0.19.0's name map lacks for the Qwen architectures
NEXTN = {
    "eh_proj": "nextn.eh_proj",
    "enorm": "nextn.enorm",
    "hnorm": "nextn.hnorm",
    "shared_head.norm": "nextn.shared_head_norm",
    "embed_tokens": "nextn.embed_tokens",
    "shared_head.head": "nextn.shared_head_head",
}
# kept in F32 whatever the file type: llama.cpp reads them so (routers, the GDN conv kernel)
F32_TENSORS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")
EXPERT_PROJ = ("down_proj", "gate_proj", "up_proj")


@dataclass(frozen=True)
class Layout:
    """What the rewrites need from config.json (text part)."""

    arch: str  # GGUF architecture
    layers: int  # decoder layers (without the MTP block)
    experts: int = 0
    hybrid: bool = False  # Gated DeltaNet layers (Qwen3-Next, Qwen3.5/3.6)
    tiled_v: bool = False  # Qwen3.5/3.6: reorder value heads to tiled order
    k_heads: int = 0
    v_heads: int = 0
    k_dim: int = 0
    v_dim: int = 0
    hidden: int = 0


def hf_name(name: str, layout: Layout, skip: tuple[str, ...]) -> str | None:
    """The checkpoint name as the language model's, or None for a tensor that is not in the GGUF."""
    if any(name == p or name.startswith(p + ".") for p in skip):
        return None
    name = name.replace("language_model.", "", 1)
    if name.startswith("model.mtp."):
        name = name[len("model.") :]
    if not name.startswith("mtp."):
        return name
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[1] == "layers" and parts[2].isdecimal():
        return f"model.layers.{layout.layers + int(parts[2])}.{parts[3]}"
    if len(parts) == 3 and parts[1] in MTP_TOP:
        return f"model.layers.{layout.layers}.{MTP_TOP[parts[1]]}.{parts[2]}"
    return name  # unknown: the name map refuses it, naming it


def block_of(name: str) -> int | None:
    """The layer number in a name (the first all-digit part)."""
    return next((int(p) for p in name.split(".") if p.isdecimal()), None)


def converted(
    names: list[str], load: Callable[[str], torch.Tensor], layout: Layout, skip: tuple[str, ...], to_gguf
) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for the checkpoint tensors `names`, loaded by `load` one at a time; experts
    stored one per tensor wait for the rest of their layer (one layer's experts at most in memory)."""
    experts: dict[int, dict[str, torch.Tensor]] = {}
    for name in names:
        hf = hf_name(name, layout, skip)
        if hf is None:
            continue
        data = load(name)
        if data.dtype not in (torch.float16, torch.float32):
            data = data.float()
        for out_name, out in _rewrite(hf, data, layout, experts):
            yield to_gguf(out_name), out
    left = [n for d in experts.values() for n in d]
    if left:
        raise ValueError(f"experts without the rest of their layer: {', '.join(left[:4])}")


def _rewrite(name: str, data: torch.Tensor, layout: Layout, experts) -> Iterator[tuple[str, torch.Tensor]]:
    if layout.tiled_v and layout.k_heads != layout.v_heads and "linear_attn." in name:
        data = tile_v(name, data, layout)
    if layout.hybrid:
        name, data = _hybrid(name, data)
        if "in_proj_qkvz.weight" in name:
            yield from _split_qkvz(name, data, layout)
            return
    yield from _experts(name, data, layout, experts)


def _hybrid(name: str, data: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Gated DeltaNet models: A as -exp(A_log), dt_bias as a bias, 2-D conv kernel, 1 + w norms."""
    if name.endswith(".A_log"):
        return name, -torch.exp(data)
    if name.endswith(".dt_bias"):
        return name.rpartition(".dt_bias")[0] + ".dt_proj.bias", data
    if "conv1d" in name:
        return name, data.squeeze()
    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        return name, data + 1
    return name, data


def _experts(name: str, data: torch.Tensor, layout: Layout, experts) -> Iterator[tuple[str, torch.Tensor]]:
    """Routed experts as one [E, ...] tensor per projection; everything else passes."""
    base = name.removesuffix(".weight")
    if base.endswith("mlp.experts.down_proj"):
        yield base + ".weight", data
    elif base.endswith("mlp.experts.gate_up_proj"):
        half = data.shape[-2] // 2
        stem = base.removesuffix(".gate_up_proj")
        yield stem + ".gate_proj.weight", data[..., :half, :].contiguous()
        yield stem + ".up_proj.weight", data[..., half:, :].contiguous()
    elif "experts" in name:
        bid = block_of(name)
        assert bid is not None, name
        layer = experts.setdefault(bid, {})
        layer[name] = data
        if len(layer) >= layout.experts * len(EXPERT_PROJ):
            for proj in EXPERT_PROJ:
                parts = [layer.pop(f"model.layers.{bid}.mlp.experts.{e}.{proj}.weight") for e in range(layout.experts)]
                yield f"model.layers.{bid}.mlp.experts.{proj}.weight", torch.stack(parts)
            del experts[bid]
    else:
        yield name, data


def _split_qkvz(name: str, data: torch.Tensor, layout: Layout) -> Iterator[tuple[str, torch.Tensor]]:
    """Qwen3-Next's [q, k, v, z] per key head into q|k|v (all heads) and z."""
    per_k = layout.v_heads // layout.k_heads * layout.v_dim
    sizes = [layout.k_dim, layout.k_dim, per_k, per_k]
    grouped = data.permute(1, 0).contiguous().view(-1, layout.k_heads, sum(sizes))
    q, k, v, z = (t.contiguous().view(layout.hidden, -1) for t in torch.split(grouped, sizes, dim=-1))
    stem = name.removesuffix(".in_proj_qkvz.weight")
    yield stem + ".in_proj_qkv.weight", torch.cat([q, k, v], dim=-1).permute(1, 0).contiguous()
    yield stem + ".in_proj_z.weight", z.permute(1, 0).contiguous()


def tile_v(name: str, data: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Value-head order grouped by key head [k0: v0 v1, k1: v0 v1] becomes tiled [k0 v0, k1 v0, k0 v1, ...]."""
    per_k = layout.v_heads // layout.k_heads

    def tile(t: torch.Tensor, dim: int, head: int) -> torch.Tensor:
        shape = list(t.shape)
        split = shape[:dim] + [layout.k_heads, per_k, head] + shape[dim + 1 :]
        return t.reshape(split).transpose(dim, dim + 1).contiguous().reshape(shape)

    if ".in_proj_qkv." in name:
        qk = 2 * layout.k_dim * layout.k_heads
        return torch.cat([data[:qk], tile(data[qk:], 0, layout.v_dim)])
    if ".in_proj_z." in name:
        return tile(data, 0, layout.v_dim)
    if ".in_proj_b." in name or ".in_proj_a." in name:
        return tile(data, 0, 1)
    if ".A_log" in name or ".dt_bias" in name:
        return tile(data.unsqueeze(-1), 0, 1).squeeze(-1) if data.ndim == 1 else tile(data, data.ndim - 1, 1)
    if ".conv1d" in name:
        flat = data.squeeze()
        qk = 2 * layout.k_dim * layout.k_heads
        return torch.cat([flat[:qk], tile(flat[qk:], 0, layout.v_dim)])
    if ".out_proj." in name:
        return tile(data, 1, layout.v_dim)
    return data
