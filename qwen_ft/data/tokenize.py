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
from qwen_ft.data.conversations import MAX_SHOWN, ReadReport
from qwen_ft.data.stats import DataStats
from qwen_ft.data.template import ChatTemplate
from qwen_ft.errors import DataError
from qwen_ft.files import atomic_dir, clean_stale_temps, digest_problems, write_digests

if TYPE_CHECKING:
    from datasets import Dataset

    from qwen_ft.config.schema import DataConfig
    from qwen_ft.data.render import Renderer

TEMPLATE_VERSION = "template-v3"  # bump when rendering or masking changes, to invalidate caches
CACHE_FORMAT = 6  # bump when the layout of a cache entry changes
CACHE_FILES = "cache_files.json"  # sizes and digests of an entry's files, written last
WRITE_BATCH = 1000
TALLY_ROWS = 65536  # rows per slice when counting the tokenized rows


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
    objective: str = "sft"  # sft: conversations; kto: KTO rows; the others: preference pairs (data/preference.py)

    @property
    def pairs(self) -> bool:
        """Rows are preference pairs (a chosen and a rejected sequence each)."""
        return self.objective not in ("sft", "kto")

    @property
    def unpaired(self) -> bool:
        """Rows are KTO's: a prompt, a completion and whether it is desirable."""
        return self.objective == "kto"

    @classmethod
    def from_config(cls, data: DataConfig, tok, objective: str = "sft") -> TokenizeSpec:
        """Spec from a DataConfig, the tokenizer whose template renders the data and the run's objective."""
        from qwen_ft.data.render import Renderer

        return cls(
            data.max_length,
            data.overlong,
            data.label_policy,
            data.default_system,
            data.on_error,
            Renderer.of(tok, data.chat_template).template,
            json.dumps(data.template_kwargs, sort_keys=True),
            objective,
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


def _write_rows(files, out: Path) -> int:
    """Stage 1: the rows' JSON text -> Arrow stream file, in batches; returns the number of rows. A row
    that is not text keeps its place with its error, so stage 2 reports every bad row in file order.
    Parsing, checking and rendering each row happen in stage 2's parallel workers."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    from qwen_ft.data.sources import iter_rows

    schema = pa.schema([(name, pa.string()) for name in ("row", "source", "read_error", "read_kind")])
    n = 0
    cols: dict[str, list] = {name: [] for name in schema.names}
    rows = (raw for path in files for raw in iter_rows(path, parse=False))
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for raw in tqdm(rows, desc="reading", unit=" row", disable=None, mininterval=1.0):
            n += 1
            text = raw.text if raw.text is not None or raw.error else json.dumps(raw.value)  # ASCII: no surrogates
            values = (text, raw.where, raw.error, raw.kind if raw.error else None)
            for name, value in zip(schema.names, values, strict=True):
                cols[name].append(value)
            if n % WRITE_BATCH == 0:
                writer.write_table(pa.table(cols, schema=schema))
                cols = {k: [] for k in cols}
        writer.write_table(pa.table(cols, schema=schema))
    return n


COLUMNS = ("input_ids", "labels", "n_supervised", "status", "error", "kind", "ignored")


def tokenize_batch(batch: dict, renderer: RendererOnce, spec: TokenizeSpec) -> dict:
    """Stage 2 (a `datasets.map` function): render and length-check a batch of conversations (or pairs)."""
    from qwen_ft.data.schema import RowError

    if spec.pairs or spec.unpaired:
        from qwen_ft.data.preference import tokenize_pairs, tokenize_unpaired

        return (tokenize_pairs if spec.pairs else tokenize_unpaired)(batch, renderer, spec)

    rows = zip(batch["row"], batch["source"], batch["read_error"], batch["read_kind"], strict=True)
    parsed = [
        RowError(error, kind) if error else _parse(text, where, spec.default_system)
        for text, where, error, kind in rows
    ]
    convs = [p[0] for p in parsed if not isinstance(p, RowError)]
    rendered = iter(renderer.get().render_many(convs, spec.label_policy))
    out: dict[str, list] = {name: [] for name in COLUMNS}
    for p in parsed:
        row = _row_of(p if isinstance(p, RowError) else next(rendered), p, renderer, spec)
        for name, value in zip(COLUMNS, row, strict=True):
            out[name].append(value)
    return out


def _row_of(rendered, parsed, renderer: RendererOnce, spec: TokenizeSpec) -> tuple:
    """One output row (the COLUMNS) of a parsed row and its rendering, or of the RowError of either."""
    from qwen_ft.data.render import fit_to_length
    from qwen_ft.data.schema import RowError

    if isinstance(rendered, RowError):
        return [], [], 0, "error", str(rendered), rendered.kind, []
    conv, ignored = parsed
    ids, labels, status = fit_to_length(
        renderer.get(), conv, rendered, spec.label_policy, spec.max_length, spec.overlong
    )
    return ids, labels, len(labels) - labels.count(IGNORE_INDEX), status, "", "", ignored


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


def _features(spec: TokenizeSpec):
    from datasets import Features, List, Value

    ints = List(Value("int32"))
    extra = {"rejected_ids": ints, "rejected_labels": ints} if spec.pairs else {}
    extra |= {"desirable": Value("bool")} if spec.unpaired else {}
    return Features(
        {
            "input_ids": ints,
            "labels": ints,
            **extra,
            "n_supervised": Value("int32"),
            "status": Value("string"),
            "error": Value("string"),
            "kind": Value("string"),
            "ignored": List(Value("string")),
            "source": Value("string"),
        }
    )


def _build(files: Sequence[str], tok, spec: TokenizeSpec, work: Path, num_proc: int) -> DataStats:
    """Run both stages into `work`; returns the stats."""
    from datasets import Dataset

    report = ReadReport(rows=_write_rows(files, work / "rows.arrow"))
    rows = Dataset.from_file(str(work / "rows.arrow"))
    if len(rows) == 0:
        raise DataError(no_conversations_message(files, report))
    mapped = rows.map(
        functools.partial(tokenize_batch, renderer=RendererOnce(tok, spec), spec=spec),
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 and len(rows) > 1024 else None,
        remove_columns=["row", "read_error", "read_kind"],
        features=_features(spec),
        cache_file_name=str(work / "data.arrow"),
        new_fingerprint="tok-" + work.name,
        desc="tokenizing",
    )
    shards = [Path(f["filename"]).name for f in mapped.cache_files]  # one per process with num_proc > 1
    counts = _tally(mapped.data, report)
    report.refuse(spec.on_error)
    if report.skipped == report.rows:
        raise DataError(no_conversations_message(files, report))
    _count_ignored(mapped.data, report)
    return DataStats(
        rows_read=report.rows,
        skipped=report.skipped,
        skipped_examples=report.shown(),
        skipped_kinds=report.kinds,
        shards=shards,
        ignored_fields=report.ignored_fields,
        **counts,
    )


def _count_ignored(mapped, report: ReadReport) -> None:
    """Row fields no format reads (ids, metadata) -> rows that had them, counted in Arrow."""
    import pyarrow.compute as pc

    for c in pc.value_counts(pc.list_flatten(mapped.column("ignored"))).to_pylist():
        report.count_ignored(str(c["values"]), int(c["counts"]))


def no_conversations_message(files: Sequence[str], report: ReadReport) -> str:
    """Why a set of files gave nothing to train on: empty, or every row skipped."""
    where = ", ".join(files)
    if report.rows == 0:
        return f"no training conversations in {where}: the file(s) hold no rows; check the paths and contents"
    return (
        f"no training conversations in {where}: all {report.rows} row(s) were skipped as bad:\n{report.error_text()}"
    )


def _tally(mapped, report: ReadReport) -> dict[str, Any]:
    """Row, status and token counts (DataStats fields), and the rows marked `status: error` added to `report`
    by kind: one pass over the memory-mapped columns in slices, so memory stays flat however long the file."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out: dict[str, Any] = dict.fromkeys(("conversations", "dropped", "truncated", "examples", "tokens"), 0)
    out |= {"supervised_tokens": 0, "dropped_examples": []}
    total = lambda arr: int(pc.sum(pc.cast(arr, "int64")).as_py() or 0)  # noqa: E731 - an empty sum is null
    for batch in mapped.table.to_batches(max_chunksize=TALLY_ROWS):
        status = batch.column("status")
        kept, dropped = pc.is_in(status, pa.array(["ok", "truncated"])), pc.equal(status, "dropped")
        out["conversations"] += len(status) - total(pc.equal(status, "error"))
        out["dropped"] += total(dropped)
        out["dropped_examples"] += (
            batch.column("source").filter(dropped).to_pylist()[: 5 - len(out["dropped_examples"])]
        )
        out["truncated"] += total(pc.equal(status, "truncated"))
        out["examples"] += total(kept)
        for ids in ("input_ids", "rejected_ids") if "rejected_ids" in batch.schema.names else ("input_ids",):
            out["tokens"] += total(pc.list_value_length(batch.column(ids)).filter(kept))
        out["supervised_tokens"] += total(batch.column("n_supervised").filter(kept))
        _add_bad_rows(batch.filter(pc.equal(status, "error")), report)
    return out


def _add_bad_rows(bad, report: ReadReport) -> None:
    """Count a slice's rows marked `status: error` by kind; keep the first messages in file order."""
    import pyarrow.compute as pc

    shown = bad.slice(0, max(0, MAX_SHOWN - len(report.errors))).to_pylist()
    report.errors += [f"{r['source']}: {r['error']}" for r in shown]
    for kind in pc.unique(bad.column("kind")).to_pylist():
        of_kind = bad.filter(pc.equal(bad.column("kind"), kind))
        report.add_errors(kind, of_kind.num_rows, of_kind.column("source")[0].as_py(), [])


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
