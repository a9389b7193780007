"""GGUF key-values of a Qwen checkpoint: hyper-parameters, tokenizer and chat template, general facts.

Keys and values are those llama.cpp's `convert_hf_to_gguf.py` writes for the same checkpoint (the tests
compare them), written with the `gguf` package's writer. Keys that gguf 0.19.0 has no helper for are
written by name, as the llama.cpp that reads them spells them.
"""

from __future__ import annotations

import json
from pathlib import Path

# The pre-tokenizer llama.cpp implements for each Qwen vocabulary (keyed by the id of <|im_start|>)
PRE_TOKENIZER = {151644: "qwen2", 248045: "qwen35"}
QWEN35_MROPE = [11, 11, 10, 0]  # llama.cpp's default sections when a Qwen3.5 config omits them


def hparams(src: Path) -> dict:
    """config.json with a composite checkpoint's text_config lifted to the top (as the language model sees it)."""
    config = json.loads((src / "config.json").read_text())
    return {**config, **config.get("text_config", {})}


def expert_count(hp: dict) -> int:
    """Routed experts (0 for a dense model); the key differs between the MoE configs."""
    return next((hp[k] for k in ("num_local_experts", "num_experts") if hp.get(k) is not None), 0)


def rope_parameters(hp: dict) -> dict:
    """transformers 5's rope_parameters, or the older rope_scaling + rope_theta, as one dict."""
    rope = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
        if key not in rope and hp.get(key) is not None:
            rope[key] = hp[key]
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    return rope


def write_hparams(w, hp: dict, arch: str, blocks: int, file_type: int) -> None:
    """Shape, attention, RoPE, experts and (for Gated DeltaNet models) state-space keys."""
    w.add_block_count(blocks)
    for key, add in (
        ("max_position_embeddings", w.add_context_length),
        ("hidden_size", w.add_embedding_length),
        ("intermediate_size", w.add_feed_forward_length),  # absent in MoE configs without dense layers
        ("num_attention_heads", w.add_head_count),
        ("num_key_value_heads", w.add_head_count_kv),
    ):
        if hp.get(key) is not None:
            add(hp[key])
    rope = rope_parameters(hp)
    _rope_scaling(w, rope)
    sections = rope.get("mrope_section") or (QWEN35_MROPE if arch.startswith("qwen35") else None)
    if sections is not None:
        w.add_rope_dimension_sections((list(sections) + [0, 0, 0, 0])[:4])
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(rope["rope_theta"])
    if hp.get("rms_norm_eps") is not None:
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if expert_count(hp):
        w.add_expert_count(expert_count(hp))
        w.add_expert_used_count(hp["num_experts_per_tok"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_file_type(file_type)
    if hp.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    if hp.get("shared_expert_intermediate_size") is not None:
        w.add_expert_shared_feed_forward_length(hp["shared_expert_intermediate_size"])
    if "linear_conv_kernel_dim" in hp:
        _gated_deltanet(w, hp, arch, blocks, rope)


def _rope_scaling(w, rope: dict) -> None:
    """Linear and YaRN context extension (Qwen2.5's long-context configs); default RoPE writes nothing."""
    import gguf

    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (
            ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
            ("attention_factor" if "attention_factor" in rope else "attn_factor", w.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        ):
            if rope.get(key) is not None:
                add(rope[key])


def _gated_deltanet(w, hp: dict, arch: str, blocks: int, rope: dict) -> None:
    """Qwen3-Next / Qwen3.5: the Gated DeltaNet state sizes, which layers are recurrent, partial RoPE."""
    layers = hp["num_hidden_layers"]
    if blocks > layers:
        w.add_nextn_predict_layers(blocks - layers)
    w.add_ssm_conv_kernel(hp["linear_conv_kernel_dim"])
    w.add_ssm_state_size(hp["linear_key_head_dim"])
    w.add_ssm_group_count(hp["linear_num_key_heads"])
    w.add_ssm_time_step_rank(hp["linear_num_value_heads"])
    w.add_ssm_inner_size(hp["linear_value_head_dim"] * hp["linear_num_value_heads"])
    if hp.get("layer_types") is not None:
        recurrent = [t == "linear_attention" for t in hp["layer_types"]] + [False] * (blocks - layers)
        w.add_array(f"{arch}.attention.recurrent_layers", recurrent)
    w.add_full_attention_interval(hp.get("full_attention_interval", 4))
    head_dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 0.25)))


def write_tokenizer(w, src: Path, vocab_size: int, pre: str, template: str | None) -> None:
    """The byte-level BPE vocabulary padded to the embedding rows, its merges, BOS/EOS/pad ids and the
    chat template (the trained one, whatever tokenizer_config.json says)."""
    import gguf

    tokens, types = vocab_list(src / "tokenizer.json", vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(src, load_merges=True)
    special.add_special_token.setdefault("bos", False)  # Qwen adds neither; llama.cpp would guess otherwise
    special.add_special_token.setdefault("eos", False)
    if template is not None:
        special.chat_template = template
    special.add_to_gguf(w, quiet=True)


def vocab_list(tokenizer_json: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1: added tokens that are special (or look
    like <|...|>) are control tokens, other added ones (<think>, <tool_call>) user-defined, unused ids padding."""
    import gguf
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = tok.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        text = by_id[i]
        tokens.append(text)
        if i not in added:
            types.append(int(gguf.TokenType.NORMAL))
        elif added[i].special or (text.startswith("<|") and text.endswith("|>")):
            types.append(int(gguf.TokenType.CONTROL))
        else:
            types.append(int(gguf.TokenType.USER_DEFINED))
    return tokens, types


def write_general(w, src: Path, name: str | None) -> None:
    """general.type, name, size label and the quantization version (after the tensor infos: the size label
    counts their parameters)."""
    import gguf

    total, shared, expert, count = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, src, name, total)
    meta.name = meta.name or src.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
