"""Columnar and tabular conversation files, read in batches: Parquet, Arrow (IPC file or stream),
CSV, and directories written by `datasets.Dataset.save_to_disk`. Rows come out as the same
`RawRow`s as JSON lines, each with its location."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from qwen_ft.data.schema import RawRow
from qwen_ft.errors import DataError

BATCH = 1000
# CSV cells are text: these columns hold JSON (lists of messages, tool schemas, kwargs) and are decoded.
JSON_COLUMNS = ("messages", "conversations", "tools", "history", "prompt", "completion", "chat_template_kwargs")


def iter_parquet(path: Path) -> Iterator[RawRow]:
    """Rows of a Parquet file, one row group batch at a time."""
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError subclasses for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    yield from _rows(path, reader.iter_batches(batch_size=BATCH))


def iter_arrow(path: Path) -> Iterator[RawRow]:
    """Rows of an Arrow IPC file or stream (datasets writes streams)."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        reader = None
    if reader is not None:
        yield from _rows(path, (reader.get_batch(i) for i in range(reader.num_record_batches)))
        return
    try:
        stream = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not an Arrow IPC file or stream ({e})") from None
    yield from _rows(path, stream)


def _rows(path: Path, batches) -> Iterator[RawRow]:
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield RawRow(f"{path} row {index}", value=_without_nulls(row))
            index += 1


def _without_nulls(value):
    """Arrow gives every message (and every tool-call argument object) each field any row has, null
    where it had none: a null field in a table is a missing one. (Store tool-call arguments as JSON
    strings in tables to keep a deliberate null.)"""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def iter_csv(path: Path) -> Iterator[RawRow]:
    """Rows of a CSV file with a header; JSON columns (messages, tools, ...) are decoded."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                yield RawRow(where, value={k: _cell(k, v) for k, v in row.items() if v not in (None, "")})
            except json.JSONDecodeError as e:
                yield RawRow(where, error=f"a JSON column is malformed ({e.msg} at column {e.colno})")


def _cell(key: str, value: str):
    stripped = value.strip()
    if key in ("prompt", "completion"):  # plain text, unless it is a JSON list of messages
        try:
            parsed = json.loads(stripped) if stripped[:1] == "[" else None
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed) else value
    if key in JSON_COLUMNS and stripped[:1] in ("[", "{"):
        return json.loads(stripped)
    return value


def iter_saved_dataset(path: Path) -> Iterator[RawRow]:
    """Rows of a directory written by `Dataset.save_to_disk` (its Arrow shards in order).

    Raises:
        DataError: a DatasetDict directory (name one split) or a directory of something else.
    """
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{path} holds several splits ({', '.join(splits)}); name one, e.g. {path / 'train'}")
    state = path / "state.json"
    if not state.is_file():
        raise DataError(
            f"{path} is a directory but not one written by datasets' save_to_disk (no state.json); "
            "list the data files instead"
        )
    for shard in json.loads(state.read_text()).get("_data_files", []):
        yield from iter_arrow(path / shard["filename"])
