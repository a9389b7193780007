"""The sizes of a Qwen decoder that memory and FLOPs depend on, read from config.json.

Qwen3.5/3.6 are hybrids: `layer_types` mixes Gated DeltaNet layers (`linear_attention`: five
projections, a depthwise conv, per-head decay and a recurrent state) with gated attention layers
(`full_attention`: q_proj also yields an output gate, so it is twice as wide). A composite checkpoint
also holds a vision tower, which sits in memory but is never trained (`frozen_params`).

A mixture of experts (`moe`) holds every routed expert in memory, while each token passes through its
top-k only: `params()` counts all of them (weights, optimizer state), `active_linear_params()` the
routed ones a token uses (FLOPs, activations).
"""

from __future__ import annotations

from dataclasses import dataclass

GDN_CHUNK = 64  # the chunk length of the chunked delta rule (transformers' and fla's)


@dataclass(frozen=True)
class Gdn:
    """Gated DeltaNet sizes (text config's linear_* keys)."""

    layers: int
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int

    @property
    def conv_dim(self) -> int:
        return 2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim

    def state_bytes(self) -> int:
        """One fp32 recurrent state (per sequence and layer): v_heads x k_dim x v_dim."""
        return self.v_heads * self.k_dim * self.v_dim * 4


@dataclass(frozen=True)
class Moe:
    """Mixture-of-experts sizes (text config's num_experts, num_experts_per_tok, moe_/shared_expert_
    intermediate_size); `layers` is how many decoder layers are sparse."""

    layers: int
    experts: int
    top_k: int
    intermediate: int
    shared: int = 0  # the shared expert's intermediate size (0: none, Qwen3-MoE)

    def expert_params(self, hidden: int) -> int:
        """Routed experts' weights in all sparse layers: gate, up and down per expert."""
        return self.layers * self.experts * 3 * hidden * self.intermediate

    def idle_params(self, hidden: int) -> int:
        """Routed experts' weights a token does not pass through (experts - top_k per layer)."""
        return self.layers * (self.experts - self.top_k) * 3 * hidden * self.intermediate


@dataclass(frozen=True)
class Shape:
    """The sizes that memory depends on (from config.json)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool
    head_dim: int
    qwen3: bool  # Qwen3 and later: no q/k/v bias, RMSNorm on q and k per head
    gdn: Gdn | None = None  # Qwen3.5/3.6: the Gated DeltaNet layers (the others are gated attention)
    frozen_params: int = 0  # a composite checkpoint's vision tower: held, never trained
    moe: Moe | None = None  # a mixture of experts: its routed experts (the shared expert is an MLP here)

    @classmethod
    def from_config(cls, c: dict) -> Shape:
        """Qwen2/3/3.5 config.json (v1 configs are mapped first; composite ones read their text_config)."""
        if c.get("model_type") == "qwen":
            from qwen_ft.model.qwen_v1 import native_config

            c = native_config(c)
        text = {**c["text_config"], "tie_word_embeddings": c.get("tie_word_embeddings")} if "text_config" in c else c
        heads = text["num_attention_heads"]
        hybrid = "linear_num_value_heads" in text
        return cls(
            text["vocab_size"],
            text["hidden_size"],
            text["num_hidden_layers"],
            heads,
            text.get("num_key_value_heads", heads),
            text["intermediate_size"],
            bool(text.get("tie_word_embeddings", False)),
            int(text.get("head_dim") or text["hidden_size"] // heads),
            c.get("model_type") not in ("qwen2", "qwen2_moe") or hybrid,
            _gdn(text) if hybrid else None,
            _vision_params(c.get("vision_config")) if "vision_config" in c else 0,
            _moe(text),
        )

    @property
    def attention_layers(self) -> int:
        """Layers with (gated) softmax attention."""
        return self.layers - (self.gdn.layers if self.gdn else 0)

    def layer_groups(self) -> list[tuple[int, dict[str, tuple[int, int]]]]:
        """(how many layers, (in, out) of each of their linear layers) per kind of decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        mlp = _mlp(self.hidden, self.intermediate)
        gate = 2 if self.gdn else 1  # gated attention: q_proj also yields the output gate
        attn = {
            "q_proj": (self.hidden, gate * q),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden),
        }
        if self.moe:  # sparse layers: the shared expert is the MLP (none in Qwen3-MoE)
            m = self.moe
            shared = _mlp(self.hidden, m.shared) if m.shared else {}
            if not self.gdn and m.layers < self.layers:  # Qwen2/3-MoE's dense layers (mlp_only_layers)
                return [(self.layers - m.layers, {**attn, **mlp}), (m.layers, {**attn, **shared})]
            mlp = shared
        groups = [(self.attention_layers, {**attn, **mlp})]
        if self.gdn:
            g = self.gdn
            groups.append(
                (
                    g.layers,
                    {
                        "in_proj_qkv": (self.hidden, g.conv_dim),
                        "in_proj_z": (self.hidden, g.v_heads * g.v_dim),
                        "in_proj_b": (self.hidden, g.v_heads),
                        "in_proj_a": (self.hidden, g.v_heads),
                        "out_proj": (g.v_heads * g.v_dim, self.hidden),
                        **mlp,
                    },
                )
            )
        return groups

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer name of the decoder layers."""
        return {name: io for _, shapes in self.layer_groups() for name, io in shapes.items()}

    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear weights, routed experts included (what quantization
        applies to)."""
        experts = self.moe.expert_params(self.hidden) if self.moe else 0
        return sum(n * sum(i * o for i, o in shapes.values()) for n, shapes in self.layer_groups()) + experts

    def active_linear_params(self) -> int:
        """The linear weights one token passes through: a mixture of experts' top-k routed experts only."""
        return self.linear_params() - (self.moe.idle_params(self.hidden) if self.moe else 0)

    def other_params(self) -> int:
        """Embeddings, untied head, q/k/v biases (Qwen2) or q/k norms (Qwen3+), layer norms, the GDN
        layers' conv, decay and gated norm, and a frozen vision tower."""
        attn = 2 * self.head_dim if self.qwen3 else (self.heads + 2 * self.kv_heads) * self.head_dim
        gdn = 0
        if self.gdn:
            g = self.gdn
            gdn = g.layers * (g.conv_dim * g.conv_kernel + 2 * g.v_heads + g.v_dim)
        heads = 1 if self.tied else 2
        routers = self.router_params()
        return (
            heads * self.vocab * self.hidden
            + self.attention_layers * attn
            + self.layers * 2 * self.hidden
            + gdn
            + self.hidden
            + self.frozen_params
            + routers
        )

    def router_params(self) -> int:
        """A mixture of experts' routers (and shared-expert gates): matmuls every token passes through."""
        m = self.moe
        return m.layers * (m.experts + (1 if m.shared else 0)) * self.hidden if m else 0

    def params(self) -> int:
        """All parameters (tied weights once)."""
        return self.linear_params() + self.other_params()


def _mlp(hidden: int, size: int) -> dict[str, tuple[int, int]]:
    """(in, out) of a gated MLP's three linear layers."""
    return {"gate_proj": (hidden, size), "up_proj": (hidden, size), "down_proj": (size, hidden)}


def nf4_bytes_per_weight(double_quant: bool) -> float:
    """bitsandbytes 4-bit storage per weight: the code plus an fp32 absmax per 64 weights, or with double
    quantization an 8-bit absmax per 64 and an fp32 scale per 256 of those."""
    return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)


def hybrid_layer_types(layers: int, interval: int = 4) -> list[str]:
    """Qwen3.5's layer pattern (transformers' default for a config without layer_types): every
    `interval`-th layer gated attention, the others Gated DeltaNet."""
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]


def _gdn(text: dict) -> Gdn:
    kinds = text.get("layer_types") or hybrid_layer_types(
        text["num_hidden_layers"], text.get("full_attention_interval", 4)
    )
    return Gdn(
        sum(k == "linear_attention" for k in kinds),
        text["linear_num_key_heads"],
        text["linear_num_value_heads"],
        text["linear_key_head_dim"],
        text["linear_value_head_dim"],
        text.get("linear_conv_kernel_dim", 4),
    )


def _moe(text: dict) -> Moe | None:
    """The routed experts of a mixture-of-experts text config (None for a dense one); a layer is sparse
    unless listed in mlp_only_layers or off the decoder_sparse_step grid, as transformers builds it."""
    experts = int(text.get("num_experts") or text.get("num_local_experts") or 0)  # the latter: transformers 5.25
    if not experts:
        return None
    step, dense = int(text.get("decoder_sparse_step", 1) or 1), set(text.get("mlp_only_layers") or [])
    sparse = sum(i not in dense and (i + 1) % step == 0 for i in range(text["num_hidden_layers"]))
    return Moe(
        sparse,
        experts,
        int(text["num_experts_per_tok"]),
        int(text["moe_intermediate_size"]),
        int(text.get("shared_expert_intermediate_size") or 0),
    )


def _vision_params(v: dict | None) -> int:
    """Parameters of a Qwen3.5 vision tower from its config: patch and position embeddings, blocks
    (two LayerNorms, qkv + proj attention and a two-layer MLP, all with biases) and the patch merger."""
    if not v:
        return 0
    h, i, m = v.get("hidden_size", 1152), v.get("intermediate_size", 4304), v.get("spatial_merge_size", 2) ** 2
    out = v.get("out_hidden_size", 3584)
    patch = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 16) ** 2 * h + h
    block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)
    merger = 2 * h + (h * m * h * m + h * m) + (h * m * out + out)
    return patch + v.get("num_position_embeddings", 2304) * h + v.get("depth", 27) * block + merger


def lora_params(shape: Shape, r: int, targets: tuple[str, ...] = ()) -> int:
    """LoRA A and B weights of rank `r` on the `targets` linear layers (empty: all of them, and every
    routed expert of a mixture of experts: one rank-r adapter per expert and fused projection)."""
    chosen = set(targets or shape.linear_shapes())
    linear = sum(
        n * sum(r * (i + o) for name, (i, o) in shapes.items() if name in chosen) for n, shapes in shape.layer_groups()
    )
    m = shape.moe
    if m is None or (targets and not any("experts." in t for t in targets)):
        return linear
    h, i = shape.hidden, m.intermediate
    return linear + m.layers * m.experts * r * ((h + 2 * i) + (i + h))
