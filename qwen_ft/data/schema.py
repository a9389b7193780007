"""A validated conversation and the row error that names what is wrong with one row.

The accepted row formats and how each is normalised are in `formats.py`. Every problem is
reported as `file:line: field: what is wrong; how to fix`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class RowError(ValueError):
    """One bad row; the message names the field and the fix (the caller adds file:line)."""


@dataclass(frozen=True)
class Conversation:
    """A normalised conversation (see formats.py) plus where it came from and the row fields left out."""

    conv: dict[str, Any]
    source: str
    ignored: tuple[str, ...] = field(default=())

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.conv["messages"]


def parse_row(row: Any, source: str, default_system: str | None) -> Conversation:
    """Validate one raw row and normalise it.

    Args:
        row: the decoded JSON value of one row.
        source: where it came from, e.g. "data/train.jsonl:17" (kept for reports).
        default_system: system prompt to insert when the row has none ("" or None: the template's own).

    Raises:
        RowError: naming the field (e.g. messages[2].role) and the fix.
    """
    from qwen_ft.data.formats import normalise

    conv, ignored = normalise(row, default_system)
    return Conversation(conv, source, tuple(ignored))
