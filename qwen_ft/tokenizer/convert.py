"""Qwen v1's `qwen.tiktoken` -> a Hugging Face fast tokenizer (`tokenizer.json`) with identical ids.

Byte-level BPE with merges recovered from the ranks and whole tokens matched first (tiktoken
behaviour), special tokens at their v1 ids, and no normalizer (tiktoken does not normalise).
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen_ft.config.schema import DEFAULT_SYSTEM
from qwen_ft.tokenizer.tiktoken_qwen import PAT_STR, SPECIALS


def convert_tiktoken(vocab_file: str | Path, out_dir: str | Path) -> Path:
    """Write tokenizer.json and tokenizer_config.json for `vocab_file` into `out_dir`.

    transformers' TikTokenConverter does the conversion (tests/integration/test_qwen_v1.py proves
    the ids equal tiktoken's); qwen-ft adds v1's pre-tokenizer pattern and special tokens.
    """
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(str(vocab_file), pattern=PAT_STR, extra_special_tokens=list(SPECIALS)).converted()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    return out


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_config() -> dict:
    """tokenizer_config.json for the converted vocabulary (ChatML template, <|im_end|> ends a turn)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768, "bos_token": None,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
