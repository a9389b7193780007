"""Batch planning: every example exactly once, rows within max_length, honest padding accounting."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_ft.data.packing import pack_rows, plan_batches


def lengths(n=500, seed=0):
    return np.random.default_rng(seed).integers(5, 300, size=n)


def test_pack_rows_places_each_example_once_within_capacity():
    lens = lengths()
    rows = pack_rows(lens, 512, np.random.default_rng(0))
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lens)))
    assert max(lens[r].sum() for r in rows) <= 512
    # best-fit decreasing is near-optimal: within a row or two of the lower bound
    assert len(rows) <= int(np.ceil(lens.sum() / 512)) + 2


def test_pack_rows_rejects_oversized_example():
    with pytest.raises(ValueError, match="exceeds max_length"):
        pack_rows(np.array([10, 600]), 512, np.random.default_rng(0))


@pytest.mark.parametrize("packing", [True, False])
def test_plan_is_reproducible_and_complete(packing):
    lens = lengths()
    a = plan_batches(lens, 512, 4, packing, seed=1)
    b = plan_batches(lens, 512, 4, packing, seed=1)
    c = plan_batches(lens, 512, 4, packing, seed=1, epoch=1)
    assert a.batches == b.batches and a.batches != c.batches
    assert sorted(i for batch in a.batches for row in batch for i in row) == list(range(len(lens)))
    assert all(len(batch) <= 4 for batch in a.batches)
    assert a.real_tokens == lens.sum()
    computed = sum(len(batch) * max(lens[r].sum() for r in batch) for batch in a.batches)
    assert a.computed_tokens == computed and a.efficiency == pytest.approx(lens.sum() / computed)


def test_length_grouping_beats_random_batching():
    lens = lengths(2000)
    grouped = plan_batches(lens, 512, 8, packing=False, seed=0)
    order = np.random.default_rng(0).permutation(len(lens))
    random_computed = sum(8 * lens[order[k : k + 8]].max() for k in range(0, len(lens), 8))
    assert grouped.efficiency > 0.9 > lens.sum() / random_computed
    assert all(len(row) == 1 for batch in grouped.batches for row in batch)


def test_packing_efficiency_is_high():
    plan = plan_batches(lengths(2000), 1024, 2, packing=True, seed=0)
    assert plan.efficiency > 0.97
