"""Conversations -> tokenized Arrow dataset on disk, cached under a content key.

Stage 1 streams validated conversations into an Arrow file (never a Python list of the whole
file). Stage 2 runs a batched, multi-process `datasets.map` that renders ChatML ids/labels,
applies the length policy and records each row's status. Dropped rows stay in the cache,
marked `status: dropped` with empty ids, so reports and `--dump` account for every input row.
The result lives in `cache_dir/<key>/` where the key hashes the data files' bytes, the
tokenizer's vocabulary, the template version and every setting that changes the output, so a
second run with the same inputs memory-maps the cache instead of tokenizing again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qwen_ft.data.chatml import IGNORE_INDEX, Framing, Policy, assemble, fit_length
from qwen_ft.data.conversations import ReadReport, read_conversations
from qwen_ft.data.stats import DataStats
from qwen_ft.files import atomic_dir

if TYPE_CHECKING:
    from datasets import Dataset

    from qwen_ft.config.schema import DataConfig

TEMPLATE_VERSION = "chatml-v1"  # bump when rendering or masking changes, to invalidate caches
CACHE_FORMAT = 2  # bump when the layout of a cache entry changes
WRITE_BATCH = 1000


@dataclass(frozen=True)
class TokenizeSpec:
    """Every setting that changes the tokenized rows (all part of the cache key)."""

    max_length: int
    overlong: Literal["truncate", "drop"]
    label_policy: Policy
    default_system: str
    on_error: Literal["error", "skip"]

    @classmethod
    def from_config(cls, data: DataConfig) -> TokenizeSpec:
        """Spec from a DataConfig."""
        return cls(data.max_length, data.overlong, data.label_policy, data.default_system, data.on_error)


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(files: Sequence[str], tokenizer_fingerprint: str, spec: TokenizeSpec) -> str:
    """Key of the tokenized cache: file contents, tokenizer, template and settings."""
    payload = {
        "files": [file_digest(f) for f in files],
        "tokenizer": tokenizer_fingerprint,
        "template": TEMPLATE_VERSION,
        "format": CACHE_FORMAT,
        "spec": asdict(spec),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _write_conversations(files, spec: TokenizeSpec, out: Path) -> ReadReport:
    """Stage 1: validated conversations -> Arrow stream file, in batches."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    strings = pa.list_(pa.string())
    schema = pa.schema([("roles", strings), ("contents", strings), ("source", pa.string())])
    report = ReadReport()
    cols: dict[str, list] = {"roles": [], "contents": [], "source": []}
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        convs = read_conversations(files, spec.default_system, spec.on_error, report)
        for conv in tqdm(convs, desc="reading", unit=" conv", disable=None, mininterval=1.0):
            cols["roles"].append(list(conv.roles))
            cols["contents"].append(list(conv.contents))
            cols["source"].append(conv.source)
            if len(cols["source"]) >= WRITE_BATCH:
                writer.write_table(pa.table(cols, schema=schema))
                cols = {k: [] for k in cols}
        writer.write_table(pa.table(cols, schema=schema))
    return report


def tokenize_batch(batch: dict, tok, spec: TokenizeSpec) -> dict:
    """Stage 2 (a `datasets.map` function): render and length-check a batch of conversations."""
    framing = Framing.of(tok)
    flat = [c for contents in batch["contents"] for c in contents]
    encoded = tok.encode_batch(flat)
    out: dict[str, list] = {"input_ids": [], "labels": [], "n_supervised": [], "status": []}
    k = 0
    for roles in batch["roles"]:
        content_ids, k = encoded[k:k + len(roles)], k + len(roles)
        keep, status = fit_length(roles, content_ids, framing, spec.max_length, spec.overlong)
        ids, labels = assemble(roles[:keep], content_ids[:keep], framing, spec.label_policy) if keep else ([], [])
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["n_supervised"].append(len(labels) - labels.count(IGNORE_INDEX))
        out["status"].append(status)
    return out


def _features():
    from datasets import Features, List, Value

    ints = List(Value("int32"))
    return Features({"input_ids": ints, "labels": ints, "n_supervised": Value("int32"),
                     "status": Value("string"), "source": Value("string")})


def _build(files: Sequence[str], tok, spec: TokenizeSpec, work: Path, num_proc: int) -> DataStats:
    """Run both stages into `work`; returns the stats."""
    from datasets import Dataset

    report = _write_conversations(files, spec, work / "conversations.arrow")
    convs = Dataset.from_file(str(work / "conversations.arrow"))
    mapped = convs.map(
        functools.partial(tokenize_batch, tok=tok, spec=spec), batched=True, batch_size=256,
        num_proc=num_proc if num_proc > 1 and len(convs) > 1024 else None, remove_columns=["roles", "contents"],
        features=_features(), cache_file_name=str(work / "data.arrow"), new_fingerprint="tok-" + work.name,
        desc="tokenizing",
    )
    shards = [Path(f["filename"]).name for f in mapped.cache_files]  # one per process with num_proc > 1
    return DataStats(rows_read=report.rows, skipped=report.skipped, skipped_examples=report.errors[:5],
                     shards=shards, **_counts(mapped.data))


def _counts(mapped) -> dict[str, Any]:
    """Row, status and token counts (DataStats fields) computed in Arrow (no per-row Python objects)."""
    import pyarrow.compute as pc

    status = mapped.column("status")
    dropped = pc.equal(status, "dropped")
    kept = mapped.filter(pc.invert(dropped))
    total = lambda arr: int(pc.sum(arr).as_py() or 0)  # noqa: E731 - sum of an empty column is null
    return {
        "conversations": len(status),
        "dropped": total(pc.cast(dropped, "int64")),
        "dropped_examples": mapped.column("source").filter(dropped).slice(0, 5).to_pylist(),
        "truncated": total(pc.cast(pc.equal(status, "truncated"), "int64")),
        "examples": kept.num_rows,
        "tokens": total(pc.list_value_length(kept.column("input_ids"))),
        "supervised_tokens": total(kept.column("n_supervised")),
    }


def tokenized_dataset(files: Sequence[str], tok, spec: TokenizeSpec, cache_dir: str,
                      num_proc: int = 1) -> tuple[Dataset, DataStats]:
    """The tokenized dataset for `files`, from the cache when the key matches.

    Returns:
        (datasets.Dataset with input_ids/labels/n_supervised/status/source, its DataStats with
        cache = "hit" or "built" and cache_path).
    """
    key = cache_key(files, tok.fingerprint, spec)
    final = Path(cache_dir) / key
    if not (final / "stats.json").is_file():
        # A complete cache entry or none; another builder's complete entry (shared filesystem) wins.
        with atomic_dir(final, complete=lambda d: (d / "stats.json").is_file()) as work:
            built = _build(files, tok, spec, work, num_proc)
            for name in os.listdir(work):
                if name not in built.shards:
                    os.remove(work / name)
            (work / "stats.json").write_text(json.dumps(built.to_dict(), indent=1))
        hit: Literal["built", "hit"] = "built"
    else:
        hit = "hit"
    stats = DataStats.from_dict(json.loads((final / "stats.json").read_text()), hit, str(final))
    return load_shards(final, stats.shards), stats


def load_shards(entry: str | Path, shards: list[str]) -> Dataset:
    """The cached dataset of a cache entry: its Arrow shards, memory-mapped and concatenated in order."""
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(str(Path(entry) / name)) for name in shards]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
