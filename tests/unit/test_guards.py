"""The loop's check that every trained weight is finite after a step (a few fused kernels, one read)."""

from __future__ import annotations

import pytest
import torch

from qwen_ft.train import loop


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_element_in_any_dtype(bad):
    tensors = [torch.ones(3, 4), torch.zeros(5, dtype=torch.bfloat16), torch.full((2,), 1e30)]
    assert loop.all_finite(tensors)
    for i in range(len(tensors)):
        spoilt = [t.clone() for t in tensors]
        spoilt[i].view(-1)[-1] = bad
        assert not loop.all_finite(spoilt), i


def test_under_zero3_the_local_partition_is_checked():
    """A ZeRO-3 parameter's data is an empty placeholder; its part lives in `ds_tensor`."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    partitioned = model[0].weight
    partitioned.ds_tensor = torch.tensor([1.0, float("inf")])
    partitioned.data = torch.empty(0)
    parts = loop.trained_parts(model)
    assert [t.tolist() for t in parts] == [[1.0, float("inf")], model[0].bias.tolist()]
    assert not loop.all_finite(parts)
