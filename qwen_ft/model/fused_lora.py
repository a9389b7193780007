"""A LoRA linear layer as one autograd function: y = x W^T + b + s * B(A(dropout(x))), exactly peft's.

peft runs the base layer, the dropout and the two adapter matmuls as separate autograd nodes, and each
keeps its own input for the backward pass: with dropout on, every adapted layer holds a dropped copy of
its input (q, k and v three copies of the same normed hidden state). This function keeps the input x
once (the same tensor for all layers reading it), the r-wide A output and the random generator's state:
the backward pass draws the same dropout mask again from that state, so nothing else is held and the
result is bit for bit peft's (`tests/integration/test_fused_lora.py`: loss and every gradient against
stock peft, with and without dropout, checkpointing and bf16 autocast).

The dropout is redrawn by the operations F.dropout ran (`_redrawn`): on CUDA the fused kernel again on the saved
input, on a CPU the noise tensor again on ones (its draws depend on the size, not the values).

Installed by `model.fused_lora: true` on every plain LoRA Linear (one active adapter, no DoRA or bias on
the adapter, an nn.Linear base); anything else, and a call that does not fit (a merged or disabled
adapter, peft's mixed-batch adapter_names, a bf16 input without autocast to meet the fp32 adapter), runs
peft's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p, training=True) if p > 0 else x


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, p: float):
        state = _rng_state(x.device) if p > 0 else None
        y = F.linear(x, weight, bias)
        h = F.linear(_dropout(x, p), a)
        out = y + F.linear(h, b) * scaling
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scaling, ctx.p, ctx.state = scaling, p, state
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        """The gradients autograd computes for peft's graph, by the same matmuls on the same operands (under
        autocast, the 16-bit copies autocast made; autograd casts a gradient to its parameter's dtype)."""
        x, weight, a, b, h = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        lora_g = flat(grad * ctx.scaling)  # the gradient of `B(h) * scaling` at B(h)
        dh = lora_g @ like(b, lora_g) if (need_a or need_x) else None
        db = (flat(h).t() @ lora_g).t() if need_b else None
        dropped, through = _redrawn(ctx, x) if (need_a or need_x) else (x, None)
        da = (like(flat(dropped), dh).t() @ dh).t() if need_a else None
        dx = None
        if need_x:
            d_dropped = through((dh @ like(a, dh)).reshape(x.shape))
            dx = (flat(grad) @ like(weight, grad)).reshape(x.shape) + d_dropped
        dw = (like(flat(x), grad).t() @ flat(grad)).t() if need_w else None
        dbias = flat(grad).sum(0) if need_bias and ctx.has_bias else None
        return dx, dw, dbias, da, db, None, None


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def like(t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`t` in `other`'s dtype: the cast autocast made in the forward pass (none outside autocast)."""
    return t if t.dtype == other.dtype else t.to(other.dtype)


def _redrawn(ctx, x: torch.Tensor):
    """The forward's dropout of `x`, drawn again from the saved generator state, and the map of a gradient back
    through it, by the operations F.dropout ran. On CUDA F.dropout is the fused native_dropout kernel (x * mask
    * 1/(1-p) computed in fp32 and rounded once; backward: native_dropout_backward), redrawn on `x` itself, whose
    layout the kernel's draws follow. On a CPU it multiplies by a noise tensor of 0 and 1/(1-p) in x's dtype,
    whose draws depend only on the size: redrawn on ones (and the gradient map is the same product)."""
    if ctx.p == 0:
        return x, lambda d: d
    devices = [x.device] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices, device_type=x.device.type):
        if x.is_cuda:
            torch.cuda.set_rng_state(ctx.state, x.device)
            dropped, mask = torch.ops.aten.native_dropout(x, ctx.p, True)
            scale = 1.0 / (1.0 - ctx.p)
            return dropped, lambda d: torch.ops.aten.native_dropout_backward(d, mask, scale)
        torch.set_rng_state(ctx.state)
        noise = F.dropout(torch.ones_like(x), ctx.p, training=True)
    return x * noise, lambda d: d * noise


def fits(layer) -> bool:
    """A peft LoRA Linear this function computes exactly (checked once, at install)."""
    from peft.tuners.lora.layer import Linear

    if type(layer) is not Linear or type(layer.base_layer) is not torch.nn.Linear:
        return False
    adapters = list(layer.lora_A.keys())
    return len(adapters) == 1 and not layer.lora_variant and layer.lora_B[adapters[0]].bias is None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    a = self.lora_A[name].weight if name in self.lora_A else None
    autocast = torch.is_autocast_enabled(x.device.type)
    if args or kwargs or a is None or self.disable_adapters or self.merged or (x.dtype != a.dtype and not autocast):
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    base = self.base_layer
    return _LoraLinear.apply(x, base.weight, base.bias, a, self.lora_B[name].weight, self.scaling[name], p)


def install_fused_lora(model) -> int:
    """Route every fitting LoRA Linear of `model` through `_LoraLinear`; returns how many."""
    count = 0
    for module in model.modules():
        if fits(module):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
