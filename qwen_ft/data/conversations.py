"""Files -> validated Conversations, with every bad row either refused or counted.

With `on_error: error` all bad rows are collected and reported together at the end (first
`MAX_SHOWN` listed) so a user fixes a file in one pass. With `on_error: skip` they are skipped
and counted in the report. No row is lost without a word.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwen_ft.data.formats import parse_row
from qwen_ft.data.schema import KINDS, Conversation, RawRow, RowError
from qwen_ft.data.sources import decoded, iter_rows
from qwen_ft.errors import DataError

MAX_SHOWN = 20
SHOWN_IN_STATS = 5


def by_kind(kinds: dict[str, list]) -> list[str]:
    """One line per kind of bad row (ReadReport.kinds): how many, and where the first is."""
    return [f"{n:,} {KINDS.get(k, k)} (first at {first})" for k, (n, first) in sorted(kinds.items())]


@dataclass
class ReadReport:
    """Counts of rows seen and rows refused while reading (by kind, with the first row of each), and of
    row fields left out."""

    rows: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first MAX_SHOWN messages, in file order
    kinds: dict[str, list] = field(default_factory=dict)  # KINDS key -> [rows, "file:line" of the first]
    ignored_fields: dict[str, int] = field(default_factory=dict)  # top-level field -> rows that had it

    def add_error(self, where: str, error: RowError) -> None:
        """Count one bad row."""
        self.add_errors(error.kind, 1, where, [f"{where}: {error}"])

    def add_errors(self, kind: str, count: int, first: str, messages: list[str]) -> None:
        """Count `count` bad rows of one kind, the first of them at `first`; keep the first MAX_SHOWN messages."""
        self.skipped += count
        self.errors += messages[: MAX_SHOWN - len(self.errors)]
        self.kinds.setdefault(kind, [0, first])[0] += count

    def count_ignored(self, name: str, rows: int = 1) -> None:
        """`rows` more rows held the top-level field `name`, which no format reads."""
        self.ignored_fields[name] = self.ignored_fields.get(name, 0) + rows

    def shown(self) -> list[str]:
        """The first few messages, with how many more there were (for the data report)."""
        more = self.skipped - min(len(self.errors), SHOWN_IN_STATS)
        return self.errors[:SHOWN_IN_STATS] + ([f"... and {more} more"] if more > 0 else [])

    def error_text(self) -> str:
        """The counts by kind, then the kept messages and how many more there were."""
        more = self.skipped - len(self.errors)
        tail = [f"... and {more} more"] if more > 0 else []
        return "\n".join([f"  {line}" for line in by_kind(self.kinds)] + [f"  {e}" for e in self.errors + tail])

    def refuse(self, on_error: str) -> None:
        """Under data.on_error=error, every bad row is reported at once, the first named first.

        Raises:
            DataError: when any row was bad and on_error is "error".
        """
        if self.skipped and on_error == "error":
            raise DataError(
                f"{self.skipped} bad row(s) of {self.rows}; the first: {self.errors[0]}\n{self.error_text()}\n"
                "Fix them, or set data.on_error=skip to skip and count them."
            )


def row_value(raw: RawRow) -> Any:
    """The decoded value of a row read from a file (decoded or still JSON text).

    Raises:
        RowError: the row is not text or not JSON.
    """
    raw = decoded(raw)
    if raw.error is not None:
        raise RowError(raw.error, raw.kind)
    return raw.value


def conversation_of(raw: RawRow, default_system: str | None) -> Conversation:
    """The one step from a row read from a file (decoded or still JSON text) to a validated conversation;
    training's tokenizing workers and every reader of conversations take it.

    Raises:
        RowError: the row is not JSON or not a conversation (the message names the field and the fix).
    """
    return parse_row(row_value(raw), raw.where, default_system)


def read_conversations(
    files: Sequence[str], default_system: str | None, on_error: str, report: ReadReport
) -> Iterator[Conversation]:
    """Yield validated conversations from `files` in order, filling `report`.

    Raises:
        DataError: at the end of reading when on_error="error" and any row was bad (all listed),
            or at once for problems that make the rest of a file unreadable.
    """
    for path in files:
        for raw in iter_rows(path):
            report.rows += 1
            try:
                conv = conversation_of(raw, default_system)
            except RowError as e:
                report.add_error(raw.where, e)
                continue
            for name in conv.ignored:
                report.count_ignored(name)
            yield conv
    report.refuse(on_error)
