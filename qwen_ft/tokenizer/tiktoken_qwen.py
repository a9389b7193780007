"""Qwen v1 tokenizer: `qwen.tiktoken` (base64 token + rank per line) loaded through tiktoken.

Special tokens follow the ranks: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then
`<|extra_0|>` ... `<|extra_204|>` (151643, 151644, 151645, 151646... for the real vocabulary).
"""

from __future__ import annotations

import base64
from pathlib import Path

from qwen_ft.errors import QwenFtError
from qwen_ft.tokenizer.base import ChatTokenizer

# Qwen v1's pre-tokenization: like cl100k but \p{N} alone, so digits split one by one.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse `qwen.tiktoken`; a malformed line is an error naming file:line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise QwenFtError(
                    f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r} ({e})"
                ) from None
    return ranks


class QwenV1Tokenizer(ChatTokenizer):
    """tiktoken-backed Qwen v1 vocabulary."""

    def __init__(self, vocab_file: str | Path):
        import tiktoken

        self.files = (Path(vocab_file),)
        ranks = read_ranks(Path(vocab_file))
        specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIALS)}
        self._enc = tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
        self.endoftext_id = specials["<|endoftext|>"]
        self.im_start_id = specials["<|im_start|>"]
        self.im_end_id = specials["<|im_end|>"]
        self.vocab_size = len(ranks) + len(SPECIALS)
        self.special_tokens = specials

    def encode(self, text: str) -> list[int]:
        """Ordinary-text ids: special-token look-alikes in `text` stay plain text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Batch `encode` (tiktoken threads it)."""
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: list[int]) -> str:
        """Decode ids; invalid UTF-8 fragments become U+FFFD."""
        return self._enc.decode(list(ids), errors="replace")
