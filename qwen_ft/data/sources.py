"""Read conversation files row by row without loading a whole file into memory.

`.jsonl` is read line by line; a `.json` list is decoded element by element from a stream,
so a file of a million conversations never becomes one Python list. Each row comes with
its location ("file:line" or "file[index] (line N)") for error messages.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_ft.data.schema import RawRow
from qwen_ft.errors import DataError

if TYPE_CHECKING:
    from qwen_ft.config.schema import DataConfig

CHUNK = 1 << 20
MAX_ELEMENT = 256 << 20  # a single .json element larger than this is treated as malformed


def iter_jsonl(path: Path, parse: bool = True) -> Iterator[RawRow]:
    """Rows of a JSON-lines file; blank lines are ignored. `parse=False` leaves each line's JSON text
    undecoded (tokenization decodes it in parallel workers)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # a UTF-8 BOM is not part of the first row
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(
                    where,
                    error=f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "re-encode the file as UTF-8",
                    kind="encoding",
                )
                continue
            if not text.strip():
                continue
            yield RawRow(where, text=text) if not parse else decoded(RawRow(where, text=text))


def decoded(raw: RawRow) -> RawRow:
    """`raw` with its JSON text decoded into `value`, or with the reason it is not JSON as its error."""
    if raw.text is None:
        return raw
    try:
        return RawRow(raw.where, value=json.loads(raw.text))
    except json.JSONDecodeError as e:
        return RawRow(raw.where, error=f"malformed JSON at column {e.colno}: {e.msg}")


class _Stream:
    """Incrementally decoded text of a file, refilled on demand, with line tracking."""

    def __init__(self, fh):
        self.fh, self.buf, self.pos, self.line, self.eof = fh, "", 0, 1, False
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.bytes_read = 0

    def fill(self) -> bool:
        """Append the next chunk; False at end of file."""
        if self.eof:
            return False
        data = self.fh.read(CHUNK)
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{self.fh.name}: not valid UTF-8 at byte {self.bytes_read + e.start}; re-encode the file as UTF-8"
            ) from None
        self.bytes_read += len(data)
        self.eof = not data
        self.line += self.buf.count("\n", 0, self.pos)  # drop what was consumed, keep counting lines
        self.buf, self.pos = self.buf[self.pos :] + text, 0
        return True

    def skip_ws(self) -> str:
        """Skip whitespace; return the next character ('' at end of file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n\ufeff":
                self.pos += 1
            if self.pos < len(self.buf) or not self.fill():
                return self.buf[self.pos : self.pos + 1]

    @property
    def here(self) -> int:
        return self.line + self.buf.count("\n", 0, self.pos)


def iter_json_list(path: Path) -> Iterator[RawRow]:
    """Elements of a top-level JSON list, decoded one at a time.

    Raises:
        DataError: for structural problems (not a list, bad UTF-8, malformed JSON), which
            cannot be skipped row by row in a .json file; the message suggests .jsonl.
    """
    decoder = json.JSONDecoder()
    with open(path, "rb") as fh:
        s = _Stream(fh)
        if s.skip_ws() != "[":
            raise DataError(
                f"{path}: expected a JSON list of conversations ('[' ...); "
                "for one object per line, name the file .jsonl"
            )
        s.pos += 1
        index = 0
        while (c := s.skip_ws()) != "]":
            if c == "":
                raise DataError(f"{path}: the JSON list is not closed (file ends after element {index - 1})")
            line = s.here
            value = _decode_element(decoder, s, path, index, line)
            yield RawRow(f"{path}[{index}] (line {line})", value=value)
            index += 1
            c = s.skip_ws()
            if c == ",":
                s.pos += 1
            elif c != "]":
                raise DataError(f"{path}:{s.here}: expected ',' or ']' after element {index - 1}, found {c!r}")


def _decode_element(decoder: json.JSONDecoder, s: _Stream, path: Path, index: int, line: int) -> Any:
    while True:
        try:
            value, end = decoder.raw_decode(s.buf, s.pos)
            s.pos = end
            return value
        except json.JSONDecodeError as e:
            if len(s.buf) - s.pos > MAX_ELEMENT or not s.fill():
                raise DataError(
                    f"{path}:{line}: malformed JSON in element {index}: {e.msg}; "
                    "fix it, or convert the file to .jsonl so data.on_error=skip can skip bad rows"
                ) from None


SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")


def iter_rows(path: str | Path, parse: bool = True) -> Iterator[RawRow]:
    """Rows of a conversation file (.jsonl, .json list, .parquet, .arrow, .csv) or of a directory
    written by `datasets.save_to_disk`.

    Raises:
        DataError: missing file, unsupported extension, or a dataset name from a hub.
    """
    from qwen_ft.data import tables

    p = Path(path)
    if p.is_dir():
        return tables.iter_saved_dataset(p)
    if not p.is_file():
        raise DataError(missing_data_message(str(path)))
    if p.suffix == ".jsonl":
        return iter_jsonl(p, parse)
    readers = {
        ".json": iter_json_list,
        ".parquet": tables.iter_parquet,
        ".arrow": tables.iter_arrow,
        ".csv": tables.iter_csv,
    }
    if p.suffix not in readers:
        raise DataError(
            f"{p}: unsupported extension {p.suffix!r}; use one of {', '.join(SUFFIXES)}, or a "
            "directory written by datasets' save_to_disk"
        )
    return readers[p.suffix](p)


def missing_data_message(name: str) -> str:
    """Why a data path that does not exist cannot be read; a hub-style name is told the toolkit is offline."""
    import re

    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).suffix:
        return (
            f"data file {name!r} not found; it looks like a dataset name on a hub, and qwen-ft works offline: "
            "it never downloads data. Download the dataset yourself and list its local files"
        )
    return f"data file {name!r} not found; check data.train_files / data.eval_files"


def file_problems(data: DataConfig) -> list[str]:
    """Data files that do not exist, and a cache directory this user cannot write."""
    from qwen_ft.files import writable

    problems = [
        f"data.{key}: {missing_data_message(f)}"
        for key in ("train_files", "eval_files")
        for f in getattr(data, key)
        if not Path(f).exists()
    ]
    if not writable(Path(data.cache_dir)):
        problems.append(
            f"data.cache_dir: {data.cache_dir!r} cannot be written by this user; choose a directory you can write"
        )
    return problems
