"""Qwen v1's `qwen.tiktoken` -> a Hugging Face fast tokenizer (`tokenizer.json`) with identical ids.

Byte-level BPE: every rank becomes a vocabulary entry (bytes mapped through GPT-2's
bytes_to_unicode), merges are recovered from the ranks (each token from its splits into two
tokens, ordered by the merged token's rank), whole tokens are matched first (tiktoken
behaviour, `ignore_merges`), and the special tokens follow at their v1 ids. There is no
normalizer: tiktoken does not normalise text.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen_ft.tokenizer.tiktoken_qwen import PAT_STR, SPECIALS, read_ranks


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary and merges equivalent to the tiktoken ranks."""
    table = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[text(token)] = rank
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [(rank, text(a), text(b)) for a, b in splits]
    merges.sort(key=lambda m: m[0])
    return vocab, [(a, b) for _, a, b in merges]


def convert_tiktoken(vocab_file: str | Path, out_dir: str | Path) -> Path:
    """Write tokenizer.json and tokenizer_config.json for `vocab_file` into `out_dir`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    ranks = read_ranks(Path(vocab_file))
    vocab, merges = vocab_and_merges(ranks)
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIALS])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    return out


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_config() -> dict:
    """tokenizer_config.json for the converted vocabulary (ChatML template, <|im_end|> ends a turn)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768, "bos_token": None,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
