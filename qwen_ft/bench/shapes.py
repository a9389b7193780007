"""The shapes of named Qwen models, as native configs: Qwen2 (Qwen v1 maps onto Qwen2 exactly) and the
Qwen3.5 text model (Gated DeltaNet + gated attention; its vision tower plays no part in text speed).

Sizes from the released config.json files; v1's intermediate_size counts both MLP halves, so the
native value is half of it. qwen3.5-9b is transformers' Qwen3_5TextConfig default, documented there
as the Qwen3.5-9B shape (9.41B parameters with its vision tower); qwen3-30b-a3b is Qwen3-30B-A3B's
config.json. `tiny`, `tiny-qwen3.5` and `tiny-qwen3-moe` are the CPU smoke shapes.
"""

from __future__ import annotations

from qwen_ft.errors import QwenFtError

SHAPES: dict[str, dict] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 151936,
    },
    "1.8b": {
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 5504,
        "vocab_size": 151936,
    },
    "7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 151936,
    },
    "14b": {
        "hidden_size": 5120,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "intermediate_size": 13696,
        "vocab_size": 152064,
    },
}
# Qwen3.5 text models: every fourth layer gated attention, the rest Gated DeltaNet
HYBRID: dict[str, dict] = {
    "tiny-qwen3.5": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
    },
    "qwen3.5-9b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "intermediate_size": 12288,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
    },
}
SHAPES.update(HYBRID)
# mixtures of experts (Qwen3-MoE): 128 experts, top-8 (30.53B parameters, 3.35B active per token)
MOE: dict[str, dict] = {
    "tiny-qwen3-moe": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
    },
    "qwen3-30b-a3b": {
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
    },
}
# the same layers, 12 of the 48 (7.9B parameters): the GPU check's Qwen3-30B-A3B-shaped case, whose random
# checkpoint fits a 64 GiB disk beside the others
MOE["qwen3-30b-a3b-12l"] = {**MOE["qwen3-30b-a3b"], "num_hidden_layers": 12}
SHAPES.update(MOE)


def shape_config(name: str) -> dict:
    """config.json contents of a Qwen2 model with the named shape (untied head, as Qwen v1).

    Raises:
        QwenFtError: unknown shape name.
    """
    if name not in SHAPES:
        raise QwenFtError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    s = SHAPES[name]
    if name in HYBRID:
        from qwen_ft.model.shape import hybrid_layer_types

        return {
            "architectures": ["Qwen3_5ForCausalLM"],
            "model_type": "qwen3_5_text",
            **s,
            "vocab_size": 248320,
            "layer_types": hybrid_layer_types(s["num_hidden_layers"]),
            "linear_conv_kernel_dim": 4,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10_000_000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10],
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "use_cache": False,
            "torch_dtype": "bfloat16",
        }
    if name in MOE:
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            **s,
            "vocab_size": 151936,
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "router_aux_loss_coef": 0.001,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "use_cache": False,
            "torch_dtype": "bfloat16",
        }
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **s,
        "num_key_value_heads": s["num_attention_heads"],
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "use_cache": False,
        "torch_dtype": "bfloat16",
    }  # special ids: from the tokenizer written beside it
