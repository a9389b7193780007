"""A row as read from a file, the validated conversation it becomes, and the row error that names what
is wrong with one row.

The accepted row formats and how each is normalised are in `formats.py`. Every problem is
reported as `file:line: field: what is wrong; how to fix`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The kinds of bad rows, as reports count them (each RowError names one).
KINDS = {
    "encoding": "not UTF-8 text (a bad byte or a lone surrogate)",
    "json": "malformed JSON",
    "format": "not a conversation in a known format",
    "no_reply": "no assistant reply",
    "message": "a malformed message or turn",
    "content": "empty or non-text content",
    "media": "an image, video or audio part",
    "tools": "a malformed tool call or tool list",
    "field": "a bad weight, loss or chat_template_kwargs",
    "template": "the chat template cannot render it",
    "pair": "a preference pair that teaches nothing or lacks a side",
    "label": "a KTO row without a boolean label",
}


@dataclass(frozen=True)
class RawRow:
    """One decoded row, or the reason (and kind, a KINDS key) it could not be decoded."""

    where: str
    value: Any = None
    error: str | None = None
    text: str | None = None  # the row's JSON text, when read unparsed (`parse=False`)
    kind: str = "json"


class RowError(ValueError):
    """One bad row; the message names the field and the fix (the caller adds file:line), `kind` (a KINDS
    key) what sort of problem it is, for the counts by kind."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return type(self), (str(self), self.kind)


@dataclass(frozen=True)
class Conversation:
    """A normalised conversation (see formats.py) plus where it came from and the row fields left out."""

    conv: dict[str, Any]
    source: str
    ignored: tuple[str, ...] = field(default=())

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.conv["messages"]
