"""The sizes of a Qwen decoder that memory and FLOPs depend on, read from config.json."""

from __future__ import annotations

from dataclasses import dataclass


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
    qwen3: bool  # Qwen3: no q/k/v bias, RMSNorm on q and k per head

    @classmethod
    def from_config(cls, c: dict) -> Shape:
        """Qwen2/3 config.json (v1 configs are mapped first)."""
        if c.get("model_type") == "qwen":
            from qwen_ft.model.qwen_v1 import native_config

            c = native_config(c)
        heads = c["num_attention_heads"]
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], heads,
                   c.get("num_key_value_heads", heads), c["intermediate_size"],
                   bool(c.get("tie_word_embeddings", False)), int(c.get("head_dim") or c["hidden_size"] // heads),
                   c.get("model_type") == "qwen3")

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear weights (what quantization applies to)."""
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    def other_params(self) -> int:
        """Embeddings, untied head, q/k/v biases (Qwen2) or q/k norms (Qwen3), and layer norms."""
        attn = 2 * self.head_dim if self.qwen3 else (self.heads + 2 * self.kv_heads) * self.head_dim
        per_layer = attn + 2 * self.hidden
        heads = 1 if self.tied else 2
        return heads * self.vocab * self.hidden + self.layers * per_layer + self.hidden

    def params(self) -> int:
        """All parameters (tied weights once)."""
        return self.linear_params() + self.other_params()


def lora_params(shape: Shape, r: int, targets: tuple[str, ...] = ()) -> int:
    """LoRA A and B weights of rank `r` on the `targets` linear layers (empty: all of them)."""
    chosen = set(targets or shape.linear_shapes())
    return shape.layers * sum(r * (i + o) for name, (i, o) in shape.linear_shapes().items() if name in chosen)
