"""Conversations -> tokenized Arrow dataset on disk, cached under a content key.

Stage 1 streams validated, normalised conversations into an Arrow file (never a Python list of
the whole file). Stage 2 runs a batched, multi-process `datasets.map` that renders them through
the tokenizer's chat template (`render.py`), applies the length policy and records each row's
status. Dropped rows stay in the cache, marked `status: dropped` with empty ids, so reports and
`--dump` account for every input row; rows the template cannot render are `status: error`.
The result lives in `cache_dir/<key>/` where the key hashes the data files' bytes, the
tokenizer's vocabulary, the template version and every setting that changes the output, so a
second run with the same inputs memory-maps the cache instead of tokenizing again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qwen_ft.data.chatml import IGNORE_INDEX, Policy
from qwen_ft.data.conversations import ReadReport
from qwen_ft.data.stats import DataStats
from qwen_ft.data.template import ChatTemplate
from qwen_ft.errors import DataError
from qwen_ft.files import atomic_dir, clean_stale_temps, digest_problems, write_digests

if TYPE_CHECKING:
    from datasets import Dataset

    from qwen_ft.config.schema import DataConfig
    from qwen_ft.data.render import Renderer

TEMPLATE_VERSION = "template-v3"  # bump when rendering or masking changes, to invalidate caches
CACHE_FORMAT = 3  # bump when the layout of a cache entry changes
CACHE_FILES = "cache_files.json"  # sizes and digests of an entry's files, written last
WRITE_BATCH = 1000


@dataclass(frozen=True)
class TokenizeSpec:
    """Every setting that changes the tokenized rows (all part of the cache key)."""

    max_length: int
    overlong: Literal["truncate", "drop"]
    label_policy: Policy
    default_system: str
    on_error: Literal["error", "skip"]
    template: ChatTemplate | None = None  # the template (and its "tool_use" one); None: Qwen v1 ChatML
    template_kwargs: str = "{}"  # JSON, keys sorted

    @classmethod
    def from_config(cls, data: DataConfig, tok) -> TokenizeSpec:
        """Spec from a DataConfig and the tokenizer whose template renders the data."""
        from qwen_ft.data.render import Renderer

        return cls(
            data.max_length,
            data.overlong,
            data.label_policy,
            data.default_system,
            data.on_error,
            Renderer.of(tok, data.chat_template).template,
            json.dumps(data.template_kwargs, sort_keys=True),
        )

    def renderer(self, tok) -> Renderer:
        """The Renderer this spec describes, for `tok`."""
        from qwen_ft.data.render import Renderer

        return Renderer(tok, self.template, json.loads(self.template_kwargs))


class RendererOnce:
    """A spec's Renderer for one tokenizer, built on first use in each process: `datasets.map` workers
    receive this object pickled without the built renderer (compiled Jinja templates do not pickle)."""

    def __init__(self, tok, spec: TokenizeSpec):
        self.tok, self.spec = tok, spec
        self._built: Renderer | None = None

    def get(self) -> Renderer:
        if self._built is None:
            self._built = self.spec.renderer(self.tok)
        return self._built

    def __getstate__(self) -> dict:
        return {"tok": self.tok, "spec": self.spec, "_built": None}


def content_digest(path: str) -> str:
    """sha256 of a file's bytes, streamed; of a directory (save_to_disk), of every file in it by name."""
    h = hashlib.sha256()
    p = Path(path)
    for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
        h.update(str(f.relative_to(p) if p.is_dir() else "").encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def cache_inputs(files: Sequence[str], tokenizer_fingerprint: str, spec: TokenizeSpec) -> dict[str, Any]:
    """What the tokenized rows depend on: file contents, tokenizer, template and settings (the cache key's
    payload; `paths` names the files for people and is no part of the key)."""
    return {
        "files": [content_digest(f) for f in files],
        "tokenizer": tokenizer_fingerprint,
        "template": TEMPLATE_VERSION,
        "renderer": _renderer_versions(),
        "format": CACHE_FORMAT,
        "spec": asdict(spec),
        "paths": [str(f) for f in files],
    }


def cache_key(inputs: dict[str, Any]) -> str:
    """Key of the tokenized cache entry of `cache_inputs`."""
    payload = {k: v for k, v in inputs.items() if k != "paths"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def input_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two `cache_inputs`, in words (empty: the same rows)."""
    if before.get("paths") != now.get("paths") or len(before.get("files", [])) != len(now["files"]):
        return [f"data files {before.get('paths')} -> {now['paths']}"]
    out = [
        f"data file {path} changed since then (its content differs)"
        for path, old, new in zip(now["paths"], before["files"], now["files"], strict=True)
        if old != new
    ]
    if before.get("tokenizer") != now["tokenizer"]:
        out.append(f"the tokenizer changed (fingerprint {before.get('tokenizer')} -> {now['tokenizer']})")
    for name in ("template", "renderer", "format"):
        if before.get(name) != now[name]:
            out.append(f"the rendering changed ({name}: {before.get(name)} -> {now[name]})")
    old_spec, new_spec = before.get("spec") or {}, now["spec"]
    changed = [k for k in new_spec if old_spec.get(k) != new_spec[k]]
    return out + [f"data setting {k}: {old_spec.get(k)!r} -> {new_spec[k]!r}"[:300] for k in changed]


def _renderer_versions() -> str:
    """transformers and jinja2 render the templates (tojson, whitespace control): part of the key."""
    from importlib.metadata import version

    return f"transformers {version('transformers')}, jinja2 {version('jinja2')}"


def _write_rows(files, out: Path) -> ReadReport:
    """Stage 1: the rows' JSON text -> Arrow stream file, in batches (undecodable rows are counted).
    Parsing, checking and rendering each row happen in stage 2's parallel workers."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    from qwen_ft.data.sources import iter_rows

    schema = pa.schema([("row", pa.string()), ("source", pa.string())])
    report = ReadReport()
    cols: dict[str, list] = {"row": [], "source": []}
    rows = (raw for path in files for raw in iter_rows(path, parse=False))
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for raw in tqdm(rows, desc="reading", unit=" row", disable=None, mininterval=1.0):
            report.rows += 1
            if raw.error is not None:
                report.add_error(f"{raw.where}: {raw.error}")
                continue
            cols["row"].append(raw.text if raw.text is not None else json.dumps(raw.value))  # ASCII: no surrogates
            cols["source"].append(raw.where)
            if len(cols["source"]) >= WRITE_BATCH:
                writer.write_table(pa.table(cols, schema=schema))
                cols = {k: [] for k in cols}
        writer.write_table(pa.table(cols, schema=schema))
    return report


def tokenize_batch(batch: dict, renderer: RendererOnce, spec: TokenizeSpec) -> dict:
    """Stage 2 (a `datasets.map` function): render and length-check a batch of conversations."""
    from qwen_ft.data.render import fit_to_length
    from qwen_ft.data.schema import RowError

    rows = zip(batch["row"], batch["source"], strict=True)
    parsed = [_parse(text, where, spec.default_system) for text, where in rows]
    convs = [p[0] for p in parsed if not isinstance(p, RowError)]
    rendered_iter = iter(renderer.get().render_many(convs, spec.label_policy))
    out: dict[str, list] = {
        "input_ids": [],
        "labels": [],
        "n_supervised": [],
        "status": [],
        "error": [],
        "ignored": [],
    }
    for p in parsed:
        error, ignored = "", [] if isinstance(p, RowError) else p[1]
        rendered = p if isinstance(p, RowError) else next(rendered_iter)
        ids: list[int]
        labels: list[int]
        if isinstance(rendered, RowError):
            ids, labels, status, error = [], [], "error", str(rendered)
        else:
            ids, labels, status = fit_to_length(
                renderer.get(), p[0], rendered, spec.label_policy, spec.max_length, spec.overlong
            )
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["n_supervised"].append(len(labels) - labels.count(IGNORE_INDEX))
        out["status"].append(status)
        out["error"].append(error)
        out["ignored"].append(ignored)
    return out


def _parse(text: str, source: str, default_system: str):
    """(conversation, ignored row fields) of one row's JSON text, or its RowError: the row taken through
    `conversations.conversation_of`, as every reader of conversations takes it."""
    from qwen_ft.data.conversations import conversation_of
    from qwen_ft.data.schema import RawRow, RowError

    try:
        parsed = conversation_of(RawRow(source, text=text), default_system)
        return parsed.conv, list(parsed.ignored)
    except RowError as e:
        return e


def _features():
    from datasets import Features, List, Value

    ints = List(Value("int32"))
    return Features(
        {
            "input_ids": ints,
            "labels": ints,
            "n_supervised": Value("int32"),
            "status": Value("string"),
            "error": Value("string"),
            "ignored": List(Value("string")),
            "source": Value("string"),
        }
    )


def _build(files: Sequence[str], tok, spec: TokenizeSpec, work: Path, num_proc: int) -> DataStats:
    """Run both stages into `work`; returns the stats."""
    from datasets import Dataset

    report = _write_rows(files, work / "rows.arrow")
    rows = Dataset.from_file(str(work / "rows.arrow"))
    if len(rows) == 0:
        _refuse_bad_rows(report, spec)
        raise DataError(no_conversations_message(files, report))
    mapped = rows.map(
        functools.partial(tokenize_batch, renderer=RendererOnce(tok, spec), spec=spec),
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 and len(rows) > 1024 else None,
        remove_columns=["row"],
        features=_features(),
        cache_file_name=str(work / "data.arrow"),
        new_fingerprint="tok-" + work.name,
        desc="tokenizing",
    )
    shards = [Path(f["filename"]).name for f in mapped.cache_files]  # one per process with num_proc > 1
    for where, message in _render_errors(mapped.data):
        report.add_error(f"{where}: {message}")
    _refuse_bad_rows(report, spec)
    if report.skipped == report.rows:
        raise DataError(no_conversations_message(files, report))
    return DataStats(
        rows_read=report.rows,
        skipped=report.skipped,
        skipped_examples=report.shown(),
        shards=shards,
        ignored_fields=_ignored_fields(mapped.data),
        **_counts(mapped.data),
    )


def _refuse_bad_rows(report: ReadReport, spec: TokenizeSpec) -> None:
    """With data.on_error=error every bad row is listed at once.

    Raises:
        DataError: when any row was bad.
    """
    if report.skipped and spec.on_error == "error":
        raise DataError(
            f"{report.skipped} bad row(s) of {report.rows}:\n{report.error_text()}\n"
            "Fix them, or set data.on_error=skip to skip and count them."
        )


def _ignored_fields(mapped) -> dict[str, int]:
    """Row fields no format reads (ids, metadata) -> rows that had them, counted in Arrow."""
    import pyarrow.compute as pc

    counts = pc.value_counts(pc.list_flatten(mapped.column("ignored")))
    return {str(c["values"]): int(c["counts"]) for c in counts.to_pylist()}


def no_conversations_message(files: Sequence[str], report: ReadReport) -> str:
    """Why a set of files gave nothing to train on: empty, or every row skipped."""
    where = ", ".join(files)
    if report.rows == 0:
        return f"no training conversations in {where}: the file(s) hold no rows; check the paths and contents"
    return (
        f"no training conversations in {where}: all {report.rows} row(s) were skipped as bad:\n{report.error_text()}"
    )


def _render_errors(mapped) -> list[tuple[str, str]]:
    """(source, message) of every row the chat template could not render."""
    import pyarrow.compute as pc

    bad = pc.equal(mapped.column("status"), "error")
    return list(
        zip(
            mapped.column("source").filter(bad).to_pylist(),
            mapped.column("error").filter(bad).to_pylist(),
            strict=True,
        )
    )


def _counts(mapped) -> dict[str, Any]:
    """Row, status and token counts (DataStats fields) computed in Arrow (no per-row Python objects)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    status = mapped.column("status")
    dropped = pc.equal(status, "dropped")
    kept = mapped.filter(pc.is_in(status, pa.array(["ok", "truncated"])))
    total = lambda arr: int(pc.sum(arr).as_py() or 0)  # noqa: E731 - sum of an empty column is null
    return {
        "conversations": len(status) - total(pc.cast(pc.equal(status, "error"), "int64")),
        "dropped": total(pc.cast(dropped, "int64")),
        "dropped_examples": mapped.column("source").filter(dropped).slice(0, 5).to_pylist(),
        "truncated": total(pc.cast(pc.equal(status, "truncated"), "int64")),
        "examples": kept.num_rows,
        "tokens": total(pc.list_value_length(kept.column("input_ids"))),
        "supervised_tokens": total(kept.column("n_supervised")),
    }


def tokenized_dataset(
    files: Sequence[str], tok, spec: TokenizeSpec, cache_dir: str, num_proc: int = 1
) -> tuple[Dataset, DataStats]:
    """The tokenized dataset for `files`, from the cache when the key matches.

    Returns:
        (datasets.Dataset with input_ids/labels/n_supervised/status/source, its DataStats with
        cache = "hit" or "built" and cache_path).
    """
    inputs = cache_inputs(files, tok.fingerprint, spec)
    key = cache_key(inputs)
    final = Path(cache_dir) / key
    if Path(cache_dir).is_dir():
        clean_stale_temps(cache_dir)  # left by runs killed while tokenizing
    if (final / "stats.json").is_file():
        _drop_if_damaged(final)
    if not (final / "stats.json").is_file():
        # A complete cache entry or none; another builder's complete entry (shared filesystem) wins.
        with atomic_dir(final, complete=lambda d: (d / "stats.json").is_file()) as work:
            built = _build(files, tok, spec, work, num_proc)
            for name in os.listdir(work):
                if name not in built.shards:
                    os.remove(work / name)
            (work / "stats.json").write_text(json.dumps(built.to_dict(), indent=1))
            write_digests(work, CACHE_FILES, whole=True)  # checked on every hit: ids are never read damaged
        hit: Literal["built", "hit"] = "built"
    else:
        hit = "hit"
    stats = DataStats.from_dict(json.loads((final / "stats.json").read_text()), hit, str(final))
    return load_shards(final, stats.shards), dataclasses.replace(stats, inputs=inputs)


def _drop_if_damaged(entry: Path) -> None:
    """Remove a cache entry whose files do not match the digests recorded when it was written (a
    truncated or altered shard, or an entry from before they were recorded), saying so: it is built
    again instead of being trained on."""
    import shutil
    import sys

    damaged = digest_problems(entry, CACHE_FILES, whole=True)
    if damaged:
        what = "; ".join(damaged[:3])
        print(f"data: tokenized cache {entry} is damaged ({what}); building it again", file=sys.stderr)
        shutil.rmtree(entry)


def load_shards(entry: str | Path, shards: list[str]) -> Dataset:
    """The cached dataset of a cache entry: its Arrow shards, memory-mapped and concatenated in order."""
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(str(Path(entry) / name)) for name in shards]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
