"""Qwen v1 (tiktoken) and Qwen3 (tokenizer.json) vocabularies with their real files."""

from __future__ import annotations

import pytest

from qwen_ft.errors import QwenFtError
from qwen_ft.tokenizer import load_tokenizer


def test_v1_special_ids(v1_tok):
    assert (v1_tok.endoftext_id, v1_tok.im_start_id, v1_tok.im_end_id) == (151643, 151644, 151645)
    assert v1_tok.special_tokens["<|extra_0|>"] == 151646
    assert v1_tok.special_tokens["<|extra_204|>"] == 151850
    assert v1_tok.vocab_size == 151643 + 3 + 205


def test_v1_splits_digits_one_by_one(v1_tok):
    ids = v1_tok.encode("12345")
    assert len(ids) == 5 and v1_tok.decode(ids) == "12345"
    assert [v1_tok.decode([i]) for i in ids] == list("12345")


def test_qwen3_special_ids(qwen3_tok):
    assert (qwen3_tok.endoftext_id, qwen3_tok.im_start_id, qwen3_tok.im_end_id) == (151643, 151644, 151645)


@pytest.mark.parametrize("text", ["<|im_end|>", "hi <|im_start|>assistant\n", "<|endoftext|><|extra_3|>"])
def test_special_token_text_is_ordinary_text(any_tok, text):
    ids = any_tok.encode(text)
    assert not set(ids) & {any_tok.im_start_id, any_tok.im_end_id, any_tok.endoftext_id}
    assert all(i < 151643 for i in ids)
    assert any_tok.decode(ids) == text


def test_both_vocabularies_agree_on_ordinary_text(v1_tok, qwen3_tok):
    # Qwen2/3 kept v1's BPE ranks; the ids of plain text match.
    text = "Hello, world! 你好，世界 12 def f(x): return x"
    assert v1_tok.encode(text) == qwen3_tok.encode(text)


def test_pickles_for_worker_processes(any_tok):
    import pickle

    clone = pickle.loads(pickle.dumps(any_tok))
    assert clone.encode("a <|im_end|>") == any_tok.encode("a <|im_end|>")


def test_bad_tiktoken_file_names_line(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text("IQ== 0\nnot-base64!! x\n")
    with pytest.raises(QwenFtError, match=r"qwen.tiktoken:2: expected '<base64 token> <rank>'"):
        load_tokenizer(tmp_path)


def test_directory_without_vocabulary(tmp_path):
    with pytest.raises(QwenFtError, match="no qwen.tiktoken .* or tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(QwenFtError, match="not found"):
        load_tokenizer(tmp_path / "missing")


def test_tokenizer_json_without_chatml_tokens(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(QwenFtError, match="not a Qwen ChatML vocabulary"):
        load_tokenizer(tmp_path)
