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


def test_large_fp16_and_bf16_weights_are_finite():
    """An fp16 L1 norm past 65504 would be inf: the norms are taken in fp32."""
    assert loop.all_finite([torch.ones(100_000, dtype=torch.float16), torch.ones(100_000, dtype=torch.bfloat16)])
    assert loop.all_finite([])


def test_under_zero3_the_local_partition_is_checked_without_its_padding():
    """A ZeRO-3 parameter's data is an empty placeholder; its part lives in `ds_tensor`, padded at
    the end with uninitialised memory (here a NaN) that is not a weight."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    partitioned = model[0].weight  # 3 elements in a partition of 4 (one process)
    partitioned.ds_numel, partitioned.ds_tensor = 3, torch.tensor([1.0, 2.0, 3.0, float("nan")])
    partitioned.data = torch.empty(0)
    parts = loop.trained_parts(model)
    assert [t.tolist() for t in parts] == [[1.0, 2.0, 3.0], model[0].bias.tolist()]
    assert loop.all_finite(parts)
    partitioned.ds_tensor[2] = float("inf")
    assert not loop.all_finite(loop.trained_parts(model))


@pytest.mark.parametrize("rank, valid", [(0, 4), (1, 4), (2, 2), (3, 0)])
def test_zero3_valid_length_per_rank(rank, valid):
    assert loop.zero3_valid_length(10, 4, rank) == valid  # 10 elements over 4 ranks: parts of 4, 2 padded
