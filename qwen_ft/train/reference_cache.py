"""`preference.precompute_ref`: the reference's log-probs of every pair, computed once before training and
kept in the data cache, so a DPO step runs the policy only.

The cache file is keyed by what the numbers depend on: the tokenized data (its datasets fingerprint),
the reference's weights (the base's config and weight files, a starting adapter's files, the method and a
quantized base's settings), the compute dtype, the attention kernel and the packing. A resumed run reads the same file;
when it is gone, the reference is computed again from the base (a full fine-tune loads its frozen copy
for that, never the trained weights). The tables are computed by the same code as the live reference
(`PreferenceLoss.reference_logps`, under the training autocast), a share of the micro-batches per
process, so the two are equal (tests/integration/test_preference.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from qwen_ft.data.prepare import plan_for
from qwen_ft.train.distributed import all_reduce_sum, barrier, print0

if TYPE_CHECKING:
    from qwen_ft.config.schema import RunConfig
    from qwen_ft.data.prepare import PreparedData

SPLITS = ("train", "eval")


def table_path(cfg: RunConfig, data: PreparedData, precision: str, attn: str) -> Path:
    """Where the reference log-probs of this run's data and reference live in the data cache."""
    from dataclasses import asdict

    from qwen_ft.model.fingerprint import model_fingerprint

    splits = {s: getattr(data, s)._fingerprint for s in SPLITS if getattr(data, s) is not None}
    identity = {
        "data": splits,
        "base": model_fingerprint(cfg.model.path),  # config.json and every weight file (sampled)
        "adapter": _adapter_identity(cfg.model.adapter) if cfg.model.adapter else None,
        "method": cfg.method,
        "quant": asdict(cfg.quant) if cfg.method == "qlora" else None,  # a 4-bit base is another reference
        "precision": precision,
        "attn": attn,
        "packing": cfg.data.packing,
        "loss_chunk_tokens": cfg.train.loss_chunk_tokens,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cfg.data.cache_dir) / "reference" / f"{key}.safetensors"


def _adapter_identity(directory: str) -> list[str]:
    """Digests of a starting adapter's config and weights."""
    from qwen_ft.files import file_digest

    return [file_digest(Path(directory) / name) for name in ("adapter_config.json", "adapter_model.safetensors")]


def table_ready(path: Path, dist) -> bool:
    """Whether every process can read the table at `path` (decided together: with a cache directory local to
    each node, one node may hold it and another not, and then all of them compute it)."""
    return all_reduce_sum([float(path.is_file())], dist)[0] == dist.world


def reference_tables(tr, path: Path, ready: bool) -> dict[str, np.ndarray]:
    """{split: [examples, 2] float32 (chosen, rejected) summed completion log-probs}: read from `path` when
    `ready` (table_ready), or
    computed for the run `tr` (train/loop.TrainingRun; each process a share of the batches) and written
    there by the main process."""
    from safetensors.numpy import load_file

    if ready:
        print0(tr.dist, f"reference log-probs: read from {path}")
        return load_file(str(path))
    tables = {s: _computed(tr, s) for s in SPLITS if getattr(tr.data, s) is not None}
    if tr.dist.is_main:
        _write(tables, path)
        print0(tr.dist, f"reference log-probs: computed once for {sum(map(len, tables.values()))} pairs, in {path}")
    barrier(tr.dist)
    return tables


def _computed(tr, split: str) -> np.ndarray:
    """The reference's log-probs of every pair of `split`, as the training step computes them."""
    batches = plan_for(tr.data_config, tr.train, tr.data, 0, split).batches
    table = np.zeros((len(getattr(tr.data, split)), 2), dtype=np.float32)
    with tr.backend.lora_inputs_uncast():
        for rows in batches[tr.dist.rank :: tr.dist.world]:
            with tr.backend.autocast():
                sums = tr.loss_fn.reference_logps(tr.tensors(rows, split))
            table[[i for row in rows for i in row]] = sums.float().view(-1, 2).cpu().numpy()
    if tr.dist.world == 1:
        return table
    summed = all_reduce_sum(table.ravel().tolist(), tr.dist)  # each pair computed by one process, zeros elsewhere
    return np.asarray(summed, dtype=np.float32).reshape(table.shape)


def _write(tables: dict[str, np.ndarray], path: Path) -> None:
    """The tables as safetensors, written whole or not at all (a concurrent reader never sees half)."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tables, str(tmp))
    os.replace(tmp, path)


def batch_reference(tables: dict[str, np.ndarray], split: str, rows: list[list[int]]) -> torch.Tensor:
    """The precomputed log-probs of a micro-batch's sequences, in collate_pairs' order (chosen, rejected, ...)."""
    order = [i for row in rows for i in row]
    return torch.from_numpy(tables[split][order].reshape(-1))
