"""Qwen tokenizers behind one small interface (see `base.ChatTokenizer`).

A directory with `qwen.tiktoken` is a Qwen v1 vocabulary (tiktoken); a directory with
`tokenizer.json` is a Qwen2/2.5/3 vocabulary (HF `tokenizers`). The kind is read from the
files present, never from the directory name.
"""

from __future__ import annotations

from pathlib import Path

from qwen_ft.errors import QwenFtError
from qwen_ft.tokenizer.base import ChatTokenizer


def load_tokenizer(path: str | Path) -> ChatTokenizer:
    """Load the Qwen tokenizer stored in directory `path`.

    Raises:
        QwenFtError: when the directory holds neither vocabulary format.
    """
    d = Path(path)
    if not d.is_dir():
        raise QwenFtError(f"tokenizer directory {str(d)!r} not found; set tokenizer.path (or model.path)")
    if (d / "qwen.tiktoken").is_file():
        from qwen_ft.tokenizer.tiktoken_qwen import QwenV1Tokenizer

        return QwenV1Tokenizer(d / "qwen.tiktoken")
    if (d / "tokenizer.json").is_file():
        from qwen_ft.tokenizer.hf import HFQwenTokenizer

        return HFQwenTokenizer(d / "tokenizer.json")
    raise QwenFtError(
        f"{d}: no qwen.tiktoken (Qwen v1) or tokenizer.json (Qwen2/2.5/3) found; "
        "point tokenizer.path at the checkpoint's tokenizer files"
    )


__all__ = ["ChatTokenizer", "load_tokenizer"]
