"""Files -> validated Conversations, with every bad row either refused or counted.

With `on_error: error` all bad rows are collected and reported together at the end (first
`MAX_SHOWN` listed) so a user fixes a file in one pass. With `on_error: skip` they are skipped
and counted in the report. No row is lost without a word.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from qwen_ft.data.formats import parse_row
from qwen_ft.data.schema import Conversation, RawRow, RowError
from qwen_ft.data.sources import decoded, iter_rows
from qwen_ft.errors import DataError

MAX_SHOWN = 20
SHOWN_IN_STATS = 5


@dataclass
class ReadReport:
    """Counts of rows seen and rows refused while reading, and of row fields left out."""

    rows: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    ignored_fields: dict[str, int] = field(default_factory=dict)  # top-level field -> rows that had it

    def add_error(self, message: str) -> None:
        """Count one bad row; keep the first MAX_SHOWN messages."""
        self.skipped += 1
        if len(self.errors) < MAX_SHOWN:
            self.errors.append(message)

    def shown(self) -> list[str]:
        """The first few messages, with how many more there were (for the data report)."""
        more = self.skipped - min(len(self.errors), SHOWN_IN_STATS)
        return self.errors[:SHOWN_IN_STATS] + ([f"... and {more} more"] if more > 0 else [])

    def error_text(self) -> str:
        """The kept messages, plus how many more there were."""
        more = self.skipped - len(self.errors)
        tail = [f"... and {more} more"] if more > 0 else []
        return "\n".join(f"  {e}" for e in self.errors + tail)


def conversation_of(raw: RawRow, default_system: str | None) -> Conversation:
    """The one step from a row read from a file (decoded or still JSON text) to a validated conversation;
    training's tokenizing workers and every reader of conversations take it.

    Raises:
        RowError: the row is not JSON or not a conversation (the message names the field and the fix).
    """
    raw = decoded(raw)
    if raw.error is not None:
        raise RowError(raw.error)
    return parse_row(raw.value, raw.where, default_system)


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
                report.add_error(f"{raw.where}: {e}")
                continue
            for name in conv.ignored:
                report.ignored_fields[name] = report.ignored_fields.get(name, 0) + 1
            yield conv
    if report.skipped and on_error == "error":
        raise DataError(
            f"{report.skipped} bad row(s) of {report.rows}:\n{report.error_text()}\n"
            "Fix them, or set data.on_error=skip to skip and count them."
        )
