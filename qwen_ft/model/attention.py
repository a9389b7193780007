"""Exact attention for packed rows: which kernel, and torch's own variable-length flash attention.

With a varlen kernel (`flash_attention_2`, or `varlen`: `torch.nn.attention.varlen`, the flash
kernel inside torch itself, no flash-attn build needed) collate flattens each micro-batch into
one padding-free row and builds `cu_seq_lens_q/k` and `max_length_q/k` on the host. Every
layer then attends within each conversation only, whatever `micro_batch_size` is, and no layer
asks the device where the conversations start (transformers would otherwise infer that from
`position_ids` with a host sync per layer, and only for batch size 1).

`sdpa` and `eager` keep padded rows; packed rows there get a block-diagonal mask from the
restarting `position_ids`, which is exact but pushes SDPA off its flash kernel.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

VARLEN = "varlen"  # our name in config files
REGISTERED = "qwen_ft_varlen"  # the name registered with transformers' AttentionInterface
FLAT = ("flash_attention_2", VARLEN)  # backends that take one flattened row plus cu_seq_lens


def flattens(attn: str) -> bool:
    """True when `attn` (a resolved name) wants micro-batches flattened into one row."""
    return attn in FLAT


def torch_varlen_available(device: torch.device) -> bool:
    """torch's varlen flash attention: the module exists and the GPU is Ampere or newer."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def model_attn_name(attn: str) -> str:
    """What to pass to `from_pretrained(attn_implementation=...)` (registering ours first)."""
    if attn != VARLEN:
        return attn
    register()
    return REGISTERED


def register() -> None:
    """Register the varlen forward with transformers (idempotent). No mask function is registered on
    purpose: for an implementation without one, transformers builds no mask and skips its packed-row
    detection (a host sync per forward); the boundaries come from cu_seq_lens instead."""
    from transformers import AttentionInterface

    AttentionInterface.register(REGISTERED, varlen_attention_forward)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface forward over one flattened row ([1, heads, tokens, dim]).

    Raises:
        ValueError: called without the cu_seq_lens that collate builds (a batch of several rows).
    """
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or query.shape[0] != 1:
        raise ValueError(
            "varlen attention needs one flattened row with cu_seq_lens_q/max_length_q "
            "(qwen-ft's collate makes them); use model.attn_implementation=sdpa here"
        )
    if dropout or kwargs.get("sliding_window"):
        raise ValueError(
            "varlen attention supports neither attention dropout nor a sliding window; use "
            "model.attn_implementation=sdpa for this model"
        )
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [tokens, heads, dim]
    if q.is_cuda and torch.is_autocast_enabled("cuda"):  # what SDPA does under autocast (RoPE made them fp32)
        q, k, v = (x.to(torch.get_autocast_dtype("cuda")) for x in (q, k, v))
    if k.shape[1] != q.shape[1] and not (q.is_cuda and _native_gqa()):  # grouped-query: repeat each k/v head
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    fn = _cuda_varlen if q.is_cuda else _reference_varlen
    out = fn(q, k, v, cu.to(torch.int32), int(max_len), scaling)
    return out.unsqueeze(0), None  # [1, tokens, heads, dim], as transformers expects


@functools.cache  # called in every layer's forward: the signature is read once per process
def _varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _native_gqa() -> bool:
    """torch's varlen_attn takes fewer key/value heads itself (torch 2.13's enable_gqa)."""
    return "enable_gqa" in _varlen_params()


def _cuda_varlen(q, k, v, cu, max_len: int, scale):
    from torch.nn.attention.varlen import varlen_attn

    # which keywords exist depends on the torch release (read from the signature above)
    kwargs: dict[str, Any] = {"window_size": (-1, 0)}  # (-1, 0) is causal in torch's varlen API
    if "is_causal" in _varlen_params():  # torch releases before window_size
        kwargs = {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        kwargs["enable_gqa"] = True
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **kwargs)


def _reference_varlen(q, k, v, cu, max_len: int, scale):
    """The same function on CPU: causal SDPA per conversation (what the kernel must equal)."""
    bounds = cu.tolist()
    outs = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # [heads, len, dim]
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
        )
    return torch.cat(outs)
