"""A row as read from a file, the validated conversation it becomes, and the row error that names what
is wrong with one row.

The accepted row formats and how each is normalised are in `formats.py`. Every problem is
reported as `file:line: field: what is wrong; how to fix`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RawRow:
    """One decoded row, or the reason it could not be decoded."""

    where: str
    value: Any = None
    error: str | None = None
    text: str | None = None  # the row's JSON text, when read unparsed (`parse=False`)


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
