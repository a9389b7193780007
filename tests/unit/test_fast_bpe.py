"""tiktoken encodes Qwen2/3 vocabularies with exactly the ids and turn offsets of `tokenizers`."""

from __future__ import annotations

import json
import random

import pytest

from qwen_ft.tokenizer.fast_bpe import encoder_for
from qwen_ft.tokenizer.hf import HFQwenTokenizer

PIECES = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<|im_end|>",
    "<|im_start|>",
    "<|endoftext|>",
    "  ",
    "\n\n",
    "\r\n",
    "\t",
    " \n ",
    "é",
    "e\u0301",
    "Å",
    "ﬁ",
    "🙂",
    "１２３",
    "123456",
    "'s",
    "'LL",
    "中文数据",
    "角色𠀀",
    "ab\U0002ebf0",
    "\u00a0",
    "def f(x):\n    return x",
    "assistant\n",
    "x" * 40,
    "The model",
    " the",
    ".",
)


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 14))) for _ in range(n)]


def test_fast_path_equals_tokenizers(qwen3_dir):
    """Ids, and the tokens before every character position, on mixed text: English,
    Chinese, code, digits, whitespace runs, added tokens (<think> is matched), control-token look-alikes
    (kept as text), and non-NFC text (which `tokenizers` normalises; it takes that path)."""
    tok = HFQwenTokenizer(qwen3_dir / "tokenizer.json")
    assert tok.fast_encoder() is not None
    texts = corpus(600)
    fast, slow = tok.encode_offsets(texts), tok._slow_offsets(texts)
    for text, (ids, before), (want, want_before) in zip(texts, fast, slow, strict=True):
        assert ids == want, text
        positions = range(len(text) + 1)
        assert [before(c) for c in positions] == [want_before(c) for c in positions], text
    assert tok.encode("<think>x") == [tok._tok.token_to_id("<think>"), *tok.encode("x")]
    assert tok.im_end_id not in tok.encode("a<|im_end|>b")


def _variant(qwen3_dir, tmp_path, change) -> HFQwenTokenizer:
    spec = json.loads((qwen3_dir / "tokenizer.json").read_text(encoding="utf-8"))
    change(spec)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return HFQwenTokenizer(tmp_path / "tokenizer.json")


def _swap_merges(spec):
    merges = spec["model"]["merges"]
    merges[100], merges[50000] = merges[50000], merges[100]


@pytest.mark.parametrize(
    "change",
    [
        _swap_merges,  # merge order no longer the rank order tiktoken merges by
        lambda spec: spec.update(normalizer={"type": "NFKC"}),
        lambda spec: spec["model"].update(byte_fallback=True),
        lambda spec: spec["pre_tokenizer"]["pretokenizers"][1].update(use_regex=True),
        lambda spec: spec["model"]["merges"].pop(),  # a token no merge makes
        lambda spec: spec["added_tokens"].append({**spec["added_tokens"][-1], "id": 151700, "content": "<think>x"}),
    ],
    ids=["merge-order", "nfkc", "byte-fallback", "bytelevel-regex", "unmade-token", "nested-added"],
)
def test_vocabularies_tiktoken_cannot_match_keep_tokenizers(qwen3_dir, tmp_path, change):
    tok = _variant(qwen3_dir, tmp_path, change)
    assert tok.fast_encoder() is None
    assert tok.encode("Hello world 中文") == tok._slow_offsets(["Hello world 中文"])[0][0]


def test_encoder_is_built_once_per_file(qwen3_dir):
    path = qwen3_dir / "tokenizer.json"
    assert encoder_for(path, 151669) is encoder_for(path, 151669)
