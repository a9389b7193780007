"""The fused per-token log-probs equal the plain expression, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch

from qwen_ft.train.token_logps import fused_token_logps


@pytest.mark.parametrize("chunk", [3, 64])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_token_logps_equal_log_softmax_gather(chunk, train_head):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=train_head)
    target = torch.randint(0, 50, (10,), generator=g)
    upstream = torch.randn(10, generator=g)  # a nonlinear loss's per-token gradient

    fused = fused_token_logps(hidden, weight, target, chunk)
    (fused * upstream).sum().backward()
    grads = (hidden.grad.clone(), weight.grad.clone() if train_head else None)
    hidden.grad, weight.grad = None, None
    plain = (hidden @ weight.T).log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    (plain * upstream).sum().backward()

    torch.testing.assert_close(fused, plain.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    if train_head:
        torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_without_gradients_nothing_is_kept_for_backward():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    with torch.no_grad():
        out = fused_token_logps(hidden, weight, torch.tensor([1, 2, 3, 4]), 2)
    assert out.grad_fn is None and out.dtype == torch.float32
