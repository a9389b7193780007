"""What tokenizing a set of conversation files produced: counts, examples of bad rows, the cache entry.

The counts are stored as `stats.json` in each cache entry (`to_dict`/`from_dict` at that
boundary, so the on-disk format stays a plain JSON object); where the entry came from
(`cache`, `cache_path`) and the eval set's own stats are added when it is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

# the fields written to stats.json (the others describe one load of the entry)
STORED = (
    "rows_read",
    "skipped",
    "skipped_examples",
    "skipped_kinds",
    "shards",
    "conversations",
    "dropped",
    "dropped_examples",
    "truncated",
    "examples",
    "tokens",
    "supervised_tokens",
    "ignored_fields",
)


@dataclass
class DataStats:
    """Counts of one tokenized data set (train or eval files)."""

    rows_read: int  # conversations (rows) read from the files, bad ones included
    skipped: int  # bad rows skipped (data.on_error=skip)
    skipped_examples: list[str]  # the first few skip messages
    skipped_kinds: dict[str, list]  # kind of bad row (schema.KINDS) -> [rows, "file:line" of the first]
    shards: list[str]  # Arrow files of the cache entry, in order
    conversations: int  # valid conversations tokenized
    dropped: int  # conversations left out as longer than data.max_length (kept in the cache, marked)
    dropped_examples: list[str]  # sources ("file:line") of the first few dropped conversations
    truncated: int  # conversations truncated at a turn boundary
    examples: int  # conversations kept (conversations - dropped)
    tokens: int  # tokens of the kept conversations
    supervised_tokens: int  # learned labels of the kept conversations
    ignored_fields: dict[str, int] = dataclasses.field(default_factory=dict)  # row field -> rows holding it
    cache: Literal["built", "hit"] | None = None  # how this load got the cache entry
    cache_path: str = ""  # the cache entry's directory
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)  # tokenize.cache_inputs of this load
    eval: DataStats | None = None  # the eval files' own stats (data.eval_files)

    def to_dict(self) -> dict[str, Any]:
        """The stats.json object: the stored counts only."""
        return {name: getattr(self, name) for name in STORED}

    @classmethod
    def from_dict(
        cls, stored: dict[str, Any], cache: Literal["built", "hit"] | None = None, cache_path: str = ""
    ) -> DataStats:
        """Stats from a stats.json object, with where this load found it."""
        return cls(**{name: stored[name] for name in STORED}, cache=cache, cache_path=cache_path)

    def with_eval(self, eval_stats: DataStats) -> DataStats:
        """A copy that also carries the eval set's stats."""
        return dataclasses.replace(self, eval=eval_stats)
