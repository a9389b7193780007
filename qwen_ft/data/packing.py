"""Batch planning: which examples share a row, which rows share a micro-batch. numpy only.

Packing (default): best-fit-decreasing bin packing of example lengths into rows of at most
`max_length` tokens, then rows shuffled into micro-batches. Attention never crosses examples:
the collator restarts `position_ids` at 0 for every example and the model builds a
block-diagonal mask from them (train with `use_cache=False`).

Without packing: one example per row, rows grouped by similar length (within shuffled
mega-batches, as HF's LengthGroupedSampler) so dynamic padding wastes little.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

MEGABATCH = 50  # micro-batches per length-grouping window


@dataclass(frozen=True)
class BatchPlan:
    """Micro-batches -> rows -> example indices, plus padding accounting."""

    batches: list[list[list[int]]]
    real_tokens: int
    computed_tokens: int

    @property
    def rows(self) -> int:
        """Number of rows (packed sequences, or examples without packing)."""
        return sum(len(b) for b in self.batches)

    @property
    def efficiency(self) -> float:
        """Real tokens / tokens computed (padding included)."""
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 1.0


def pack_rows(lengths: np.ndarray, max_length: int, rng: np.random.Generator) -> list[list[int]]:
    """Best-fit-decreasing packing; ties in length are broken randomly by `rng`.

    Open rows are kept in buckets by remaining capacity with a sorted list of the non-empty
    capacities (at most `max_length` entries), so each placement is a bisect, not a scan.
    """
    if len(lengths) and int(lengths.max()) > max_length:
        raise ValueError(f"an example of {int(lengths.max())} tokens exceeds max_length={max_length}")
    perm = rng.permutation(len(lengths))
    order = perm[np.argsort(-lengths[perm], kind="stable")]
    smallest = int(lengths.min()) if len(lengths) else 0
    rows: list[list[int]] = []
    buckets: dict[int, list[int]] = defaultdict(list)
    caps: list[int] = []  # sorted remaining capacities that have open rows
    for i in order.tolist():
        need = int(lengths[i])
        j = bisect.bisect_left(caps, need)
        if j < len(caps):
            cap = caps[j]
            row = buckets[cap].pop()
            if not buckets[cap]:
                caps.pop(j)
        else:
            cap, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        rest = cap - need
        if rest >= smallest:  # a row that cannot take even the shortest example is closed
            if not buckets[rest]:
                bisect.insort(caps, rest)
            buckets[rest].append(row)
    return rows


def _length_grouped(lengths: np.ndarray, micro_batch_size: int, rng: np.random.Generator) -> list[list[list[int]]]:
    order = rng.permutation(len(lengths))
    window = micro_batch_size * MEGABATCH
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")].tolist()
        batches += [[[i] for i in chunk[k : k + micro_batch_size]] for k in range(0, len(chunk), micro_batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def plan_batches(
    lengths: np.ndarray, max_length: int, micro_batch_size: int, packing: bool, seed: int, epoch: int = 0
) -> BatchPlan:
    """Plan the micro-batches of one epoch.

    Args:
        lengths: token count of each example.
        max_length: row capacity when packing.
        micro_batch_size: rows per micro-batch.
        packing: pack several examples per row, or one example per row.
        seed, epoch: make the plan reproducible and different per epoch.

    Returns:
        BatchPlan with padding accounting (each micro-batch is padded to its longest row).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    if packing:
        rows = pack_rows(lengths, max_length, rng)
        rows = [rows[i] for i in rng.permutation(len(rows))]
        batches = [rows[k : k + micro_batch_size] for k in range(0, len(rows), micro_batch_size)]
    else:
        batches = _length_grouped(lengths, micro_batch_size, rng)
    computed = sum(len(b) * max(int(lengths[r].sum()) for r in b) for b in batches)
    return BatchPlan(batches, int(lengths.sum()), computed)
