"""The shapes of named Qwen models, as native Qwen2 configs (Qwen v1 maps onto Qwen2 exactly).

Sizes from the released config.json files; v1's intermediate_size counts both MLP halves, so the
native value is half of it. `tiny` is the CPU smoke shape.
"""

from __future__ import annotations

from qwen_ft.errors import QwenFtError

SHAPES: dict[str, dict] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
             "vocab_size": 151936},
    "1.8b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 5504,
             "vocab_size": 151936},
    "7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
           "vocab_size": 151936},
    "14b": {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "intermediate_size": 13696,
            "vocab_size": 152064},
}


def shape_config(name: str) -> dict:
    """config.json contents of a Qwen2 model with the named shape (untied head, as Qwen v1).

    Raises:
        QwenFtError: unknown shape name.
    """
    if name not in SHAPES:
        raise QwenFtError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    s = SHAPES[name]
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **s,
            "num_key_value_heads": s["num_attention_heads"], "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
            "use_cache": False, "torch_dtype": "bfloat16"}  # special ids: from the tokenizer written beside it
