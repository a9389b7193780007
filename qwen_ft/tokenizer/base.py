"""The interface the data pipeline needs from a tokenizer.

`encode` treats its input as ordinary text: a message that contains the characters
`<|im_end|>` is encoded as those characters, never as the control token. Only the ChatML
framing in `qwen_ft.data.chatml` inserts control-token ids.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class ChatTokenizer:
    """Base class: ids of the ChatML control tokens plus ordinary-text encode/decode."""

    im_start_id: int
    im_end_id: int
    endoftext_id: int
    vocab_size: int
    files: tuple[Path, ...]  # the files that define the vocabulary (copied next to checkpoints)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as ordinary text (no special tokens recognised)."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many strings (subclasses use the library's batch path)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, control tokens included as their names."""
        raise NotImplementedError

    supports_templates = False  # True where chat templates render (tokenizer.json vocabularies)

    @property
    def directory(self) -> Path:
        """The directory holding the vocabulary (and the chat template, where there is one)."""
        return self.files[0].parent

    def save_files(self, out: str | Path) -> Path:
        """Copy the vocabulary files into `out` (next to saved weights, so outputs tokenize alike)."""
        from qwen_ft.files import copy_into

        return copy_into(self.files, out, self.directory)

    def special_ids(self) -> dict[str, int]:
        """config.json's special ids for a model on this vocabulary: <|endoftext|> begins and pads,
        <|im_end|> ends a turn."""
        return {"bos_token_id": self.endoftext_id, "eos_token_id": self.im_end_id, "pad_token_id": self.endoftext_id}

    @property
    def fingerprint(self) -> str:
        """Hash of the vocabulary files; part of the tokenized-data cache key."""
        h = hashlib.sha256(type(self).__name__.encode())
        for f in self.files:
            h.update(f.read_bytes())
        return h.hexdigest()[:16]
