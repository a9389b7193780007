"""The data stage of a run: config + tokenizer -> train/eval datasets, batch plan and stats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qwen_ft.data.conversations import by_kind
from qwen_ft.data.packing import BatchPlan, plan_batches
from qwen_ft.data.stats import DataStats
from qwen_ft.data.tokenize import TokenizeSpec, tokenized_dataset
from qwen_ft.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

    from qwen_ft.config.schema import DataConfig, TrainConfig


@dataclass
class PreparedData:
    """Tokenized examples ready for batching (dropped rows removed)."""

    train: Dataset
    eval: Dataset | None
    stats: DataStats  # of the train files (their eval split included); the eval files' in stats.eval

    @property
    def pairs(self) -> bool:
        """The examples are preference pairs (a chosen and a rejected sequence each)."""
        return "rejected_ids" in self.train.column_names

    @property
    def unpaired(self) -> bool:
        """The examples are KTO's (one sequence each, desirable or not)."""
        return "desirable" in self.train.column_names

    def lengths(self, split: str = "train") -> np.ndarray:
        """Token count of every example of `split` (of both sequences of a pair)."""
        import pyarrow.compute as pc

        ds = getattr(self, split)
        table = ds.with_format("arrow")[:]  # honours the selection of kept rows
        columns = ("input_ids", "rejected_ids") if self.pairs else ("input_ids",)
        return sum(pc.list_value_length(table.column(c)).to_numpy(zero_copy_only=False) for c in columns)


def _kept(ds: Dataset) -> Dataset:
    import pyarrow as pa
    import pyarrow.compute as pc

    kept = pc.is_in(ds.data.column("status"), pa.array(["ok", "truncated"]))
    keep = np.flatnonzero(kept.to_numpy(zero_copy_only=False))
    return ds if len(keep) == len(ds) else ds.select(keep)


def _split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out `fraction` of the examples for eval (at least one), reproducibly."""
    order = np.random.default_rng(seed).permutation(len(ds))
    n_eval = max(1, int(round(len(ds) * fraction)))
    return ds.select(np.sort(order[n_eval:])), ds.select(np.sort(order[:n_eval]))


def prepare_data(d: DataConfig, tok, seed: int, objective: str = "sft") -> PreparedData:
    """Tokenize (or load from cache) the train and eval data of `d` (an eval_fraction held out with `seed`):
    conversations, or preference pairs for a preference `objective`.

    Raises:
        DataError: when no example survives validation and length checks.
    """
    spec = TokenizeSpec.from_config(d, tok, objective)
    full, stats = tokenized_dataset(d.train_files, tok, spec, d.cache_dir, d.num_proc)
    train, eval_ds = _kept(full), None
    if len(train) == 0:
        raise DataError(
            f"no training example left out of {stats.rows_read} row(s) in {', '.join(d.train_files)} "
            f"(skipped {stats.skipped}, dropped {stats.dropped} as longer than "
            f"data.max_length={d.max_length}); fix the data or raise data.max_length"
        )
    if d.eval_files:
        eval_full, eval_stats = tokenized_dataset(d.eval_files, tok, spec, d.cache_dir, d.num_proc)
        eval_ds, stats = _kept(eval_full), stats.with_eval(eval_stats)
    elif d.eval_fraction > 0:
        if len(train) < 2:
            raise DataError("data.eval_fraction needs at least 2 examples; set it to 0 or add data")
        train, eval_ds = _split(train, d.eval_fraction, seed)
    return PreparedData(train, eval_ds, stats)


def plan_for(d: DataConfig, train: TrainConfig, data: PreparedData, epoch: int = 0, split: str = "train") -> BatchPlan:
    """The batch plan of one epoch of `split` under the config's length, packing and micro-batch settings (a
    pair's two sequences, each up to max_length, travel together: its rows hold twice as much)."""
    width = d.max_length * (2 if data.pairs else 1)
    return plan_batches(data.lengths(split), width, train.micro_batch_size, d.packing, train.seed, epoch)


def format_stats(stats: DataStats, plan: BatchPlan | None, d: DataConfig, micro_batch_size: int) -> str:
    """Human-readable preprocessing report."""
    tok, sup = stats.tokens, stats.supervised_tokens
    lines = [
        ("conversations read", f"{stats.rows_read:,}"),
        ("skipped (bad rows)", f"{stats.skipped:,}"),
        (f"dropped (> {d.max_length} tokens)", f"{stats.dropped:,}"),
        ("truncated at a turn", f"{stats.truncated:,}"),
        ("examples", f"{stats.examples:,}"),
        ("tokens", f"{tok:,}"),
        ("supervised tokens", f"{sup:,} ({100 * sup / max(tok, 1):.1f}%)"),
    ]
    if plan is not None:
        mode = "packed rows" if d.packing else "rows (no packing)"
        lines += [
            (mode, f"{plan.rows:,}"),
            ("padding efficiency", f"{100 * plan.efficiency:.1f}% (micro_batch_size {micro_batch_size})"),
        ]
    width = max(len(k) for k, _ in lines)
    out = [f"  {k:<{width}}  {v}" for k, v in lines]
    out += [f"  skipped: {line}" for line in by_kind(stats.skipped_kinds)]
    for kind, examples in (("skipped", stats.skipped_examples), ("dropped", stats.dropped_examples)):
        out += [f"  {kind}: {e}" for e in examples]
    if stats.dropped > len(stats.dropped_examples):
        out.append(f"  dropped: ... and {stats.dropped - len(stats.dropped_examples)} more")
    out += [
        f"  left out: row field {name!r} in {n:,} row(s) (not part of any format qwen-ft reads)"
        for name, n in sorted(stats.ignored_fields.items())
    ]
    return "\n".join(out)
