"""Qwen2/2.5/3 tokenizer: `tokenizer.json` loaded with HF `tokenizers` (no transformers needed)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from qwen_ft.errors import QwenFtError
from qwen_ft.tokenizer.base import ChatTokenizer
from qwen_ft.tokenizer.fast_bpe import FastEncoder, encoder_for, is_nfc

FAST_FROM = 64  # texts in one call from which building the tiktoken encoder (~0.7 s, once) pays off


def _tokens_before(encoding, char: int) -> int:
    """Tokens of `encoding` that begin before character `char` (a token straddling it counts)."""
    if char <= 0:
        return 0
    index = encoding.char_to_token(char - 1)  # the token holding the last character before `char`
    return len(encoding.ids) if index is None else index + 1


class HFQwenTokenizer(ChatTokenizer):
    """A `tokenizers.Tokenizer` whose special tokens are never recognised inside text. Text is encoded
    by tiktoken where that gives the same ids (`fast_bpe`), else by `tokenizers`."""

    supports_templates = True
    _fast: FastEncoder | bool | None = None  # None: not built yet; False: this vocabulary needs `tokenizers`

    def __init__(self, tokenizer_json: str | Path):
        from tokenizers import Tokenizer

        path = Path(tokenizer_json)
        # the chat template servers render with (transformers 5 keeps named ones in a folder beside it)
        names = ("tokenizer_config.json", "chat_template.jinja", "additional_chat_templates/tool_use.jinja")
        self.files = tuple(p for p in (path, *(path.parent / n for n in names)) if p.is_file())
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad JSON
            raise QwenFtError(f"{path}: not a valid tokenizer.json ({e})") from None
        # Special tokens (<|im_start|>, <|im_end|>, ...) typed by a user are text, not control tokens.
        self._tok.encode_special_tokens = True
        ids = {t: self._tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise QwenFtError(f"{path}: no {', '.join(missing)} token; this is not a Qwen ChatML vocabulary")
        self.im_start_id, self.im_end_id, self.endoftext_id = (i for i in ids.values() if i is not None)  # all found
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_fast"}  # rebuilt where it is used

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tok.encode_special_tokens = True  # not guaranteed to survive pickling into workers

    def fast_encoder(self) -> FastEncoder | None:
        """The tiktoken encoder equal to this vocabulary, built on first use, or None."""
        if self._fast is None:
            self._fast = encoder_for(self.files[0], self.vocab_size) or False
        return self._fast if isinstance(self._fast, FastEncoder) else None

    def encode(self, text: str) -> list[int]:
        """Ordinary-text ids (no BOS/EOS added, special-token look-alikes kept as text)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Batch `encode` (tiktoken where it gives the same ids, else `tokenizers` in Rust)."""
        return [ids for ids, _ in self.encode_offsets(texts)]

    def encode_offsets(self, texts: list[str]) -> list[tuple[list[int], Callable[[int], int]]]:
        """`encode_batch`, each with a function counting the tokens that begin before a character
        position (asked once per turn header, so token offsets are never all built in Python)."""
        fast = self.fast_encoder() if len(texts) >= FAST_FROM or self._fast is not None else None
        if fast is None:  # a few texts (a chat prompt) do not wait for the build
            return self._slow_offsets(texts)
        easy = [is_nfc(t) for t in texts]
        quick = iter(fast.encode_batch([t for t, ok in zip(texts, easy, strict=True) if ok]))
        slow = iter(self._slow_offsets([t for t, ok in zip(texts, easy, strict=True) if not ok]))
        return [
            (ids := next(quick), fast.tokens_before(text, ids)) if ok else next(slow)
            for text, ok in zip(texts, easy, strict=True)
        ]

    def _slow_offsets(self, texts: list[str]) -> list[tuple[list[int], Callable[[int], int]]]:
        """`tokenizers` itself (text the NFC normaliser changes, vocabularies tiktoken cannot match)."""
        return [(e.ids, partial(_tokens_before, e)) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def special_tokens(self) -> dict[str, int]:
        """The control tokens: added tokens marked special (<|im_start|>, <|im_end|>, <|endoftext|>, ...).
        Non-special added tokens such as <think> and <tool_call> are matched inside text, as in
        apply_chat_template."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def decode(self, ids: list[int]) -> str:
        """Decode ids, control tokens kept."""
        return self._tok.decode(list(ids), skip_special_tokens=False)
