"""Exact packing through Gated DeltaNet layers (Qwen3.5/3.6): each conversation sees nothing before it.

A GDN layer mixes tokens in two ways that restarting `position_ids` do not reach: a causal
depthwise conv over the last 4 tokens, and the delta-rule state that carries everything before.
transformers' torch fallbacks take `cu_seqlens` and drop it, so a packed row leaks the previous
conversation into 75% of the layers (and with flattening kwargs it raises instead).

qwen-ft keeps them apart exactly: collate makes, on the host, a gather index that lays each packed
conversation out as its own row of a [conversations, longest] batch (right-padded with a zero
vector), and a scatter index back. The GDN layer runs its own forward on that batch, where each
row starts from zero conv history and zero state, as a conversation alone does; right padding is
causal-safe (it comes after every real token). The same holds with flash-linear-attention kernels
installed (transformers calls them from the same forward), so the path is exact on CPU and GPU.
"""

from __future__ import annotations

import functools

import torch

from qwen_ft.data.collate import GATHER, GROUPS, SCATTER

FLATTENING = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # for attention layers only


def packed_forward(original, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs):
    """The layer's own forward, once per packed conversation (in a few length-grouped batches), when
    collate gave the indices; the layer's forward unchanged otherwise."""
    gather, scatter, groups = (kwargs.pop(k, None) for k in (GATHER, SCATTER, GROUPS))
    if gather is None:
        return original(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    if cache is not None:
        raise ValueError("packed rows are for training without a cache (use_cache=False)")
    rest = {k: v for k, v in kwargs.items() if k not in FLATTENING}
    rows, width, hidden = hidden_states.shape
    flat = torch.cat([hidden_states.reshape(rows * width, hidden), hidden_states.new_zeros(1, hidden)])
    laid_out = flat[gather]
    outs, at = [], 0
    for segments, longest in groups:
        block = laid_out[at : at + segments * longest].view(segments, longest, hidden)
        outs.append(original(block, cache=None, attention_mask=None, **rest).reshape(segments * longest, -1))
        at += segments * longest
    return torch.cat(outs)[scatter].view(rows, width, -1)


def is_gdn(module: torch.nn.Module) -> bool:
    """A Gated DeltaNet token mixer (Qwen3.5/3.6's, Qwen3-Next's)."""
    return type(module).__name__.endswith("GatedDeltaNet")


def install_packed_gdn(model: torch.nn.Module) -> int:
    """Make every GDN layer of `model` honour collate's segment indices (idempotent); returns how many
    GDN layers do, those wrapped before included."""
    count = 0
    for module in model.modules():
        if not is_gdn(module):
            continue
        if not getattr(module, "_qwen_ft_packed", False):
            module.forward = functools.partial(packed_forward, module.forward)
            setattr(module, "_qwen_ft_packed", True)  # noqa: B010 - not an nn.Module attribute mypy knows
        count += 1
    return count
