"""Per-token log-probabilities through the output layer, chunk by chunk, without holding logits.

The preference objectives need each learned token's log-prob (summed per sequence, then a nonlinear
loss), so unlike the cross-entropy of `loss.fused_linear_cross_entropy` the gradient is not known in
the forward. Forward: each chunk's logits, its log-sum-exp in place, the target's log-prob; nothing
but the inputs is saved. Backward: each chunk's logits again, turned into the softmax in place, then
d/d logits = g (onehot - softmax) for the incoming per-token g, multiplied into the hidden states' (and
a trained output layer's) gradients. One chunk-sized fp32 buffer at a time, where activation
checkpointing of the plain expression holds the logits, the log-softmax and its gradient at once.
"""

from __future__ import annotations

import torch

from qwen_ft.train.loss import exp_shifted_, matmul_dtype


def fused_token_logps(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
    """log_softmax(hidden @ weight.T)[i, target[i]] for every row i, in fp32 (matmuls in the autocast dtype,
    as `nn.Linear` would run them)."""
    dtype = matmul_dtype(hidden)
    if not torch.is_grad_enabled():  # a reference or eval forward: needs_input_grad would follow requires_grad
        hidden, weight = hidden.detach(), weight.detach()
    return _FusedTokenLogps.apply(hidden, weight, target, chunk, dtype)


class _FusedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, chunk: int, dtype: torch.dtype):
        out = torch.empty(target.numel(), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, target.numel(), chunk):
                logits = (hidden[start : start + chunk].to(dtype) @ w.T).float()
                t = target[start : start + chunk]
                picked = logits.gather(1, t[:, None]).squeeze(1)
                top, sums = exp_shifted_(logits)
                out[start : start + chunk] = picked - (top + sums.log()).squeeze(1)
        ctx.save_for_backward(hidden, weight, target)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, target = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            for start in range(0, target.numel(), ctx.chunk):
                h, t = hidden[start : start + ctx.chunk].to(ctx.dtype), target[start : start + ctx.chunk]
                g_out = grad_out[start : start + ctx.chunk].float()
                g = (h @ w.T).float()
                _, sums = exp_shifted_(g)
                g.mul_(-g_out[:, None] / sums)  # -g * softmax, in the logits' own buffer
                g[torch.arange(t.numel(), device=t.device), t] += g_out
                g = g.to(ctx.dtype)
                if grad_h is not None:
                    grad_h[start : start + ctx.chunk] = g @ w
                if grad_w is not None and ctx.dtype == torch.float16:  # fp16's range: sum in fp32
                    grad_w.addmm_(g.T.float(), h.float())
                elif grad_w is not None:
                    grad_w += g.T @ h
        return grad_h, grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None
