"""Model FLOPs of a training step and model-FLOPs utilisation (MFU).

Counted per token, as matmul FLOPs the method needs (not what an implementation happens to run):
forward 2 per weight, backward 2 per weight for the input gradients and 2 more per *trainable*
weight for the weight gradients. So full fine-tuning is the usual 6N, a frozen base 4N (a mixture of
experts: the top-k routed experts a token passes through, and its routers); activation recomputation
(gradient checkpointing) is not counted, as in PaLM's MFU. Causal attention adds 2 * L * q_width per
layer and token forward (QK^T and AV over half the square), twice that backward. The output layer is
counted at learned positions only, since nothing else needs it. Gated DeltaNet layers add the chunked
delta rule's state read and update and its in-chunk attention (`gdn_flops_per_token`), a convention: the
kernels also build each chunk's triangular inverse, which is not counted.

`hardware_flops` adds what recomputation runs again (HFU, the figure that counts it); `torchtitan_flops`
is the per-token 6 x (parameters - embeddings) + 12 x layers x q_width x L that torchtitan reports
(full-square attention, every weight trained), for comparing with figures quoted that way.
tests/integration/test_flops.py checks `step_flops` and `hardware_flops` against torch's FlopCounterMode
on tiny dense, Qwen3.5 and mixture-of-experts models.
"""

from __future__ import annotations

from qwen_ft.model.shape import Shape

# Dense bf16 tensor-core peaks (TFLOPS) from the vendors' data sheets; the first matching name wins.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("H20", 148.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
)


def device_peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of a GPU by its name, or None (CPUs and unknown GPUs: pass --peak-tflops)."""
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def step_flops(shape: Shape, method: str, length: int, sequences: int, learned: int, adapter_params: int = 0) -> float:
    """Model FLOPs of one optimizer step over `sequences` rows of `length` tokens, `learned` of them labelled.

    `adapter_params`: LoRA weights (trained: 6 FLOPs per weight and token). A mixture of experts
    counts the linear weights a token passes through (its top-k routed experts), not all it holds.
    """
    tokens = sequences * length
    weights = shape.active_linear_params() + shape.router_params()
    body = tokens * ((6 if method == "full" else 4) * weights + 6 * adapter_params)
    head = learned * shape.vocab * shape.hidden * (6 if method in ("full", "lora_emb") else 4)
    attention = tokens * shape.attention_layers * 6 * length * shape.heads * shape.head_dim
    return float(body + head + attention + tokens * gdn_flops_per_token(shape))


def recompute_flops(
    shape: Shape, length: int, sequences: int, adapter_params: int = 0, fraction: float = 1.0
) -> float:
    """The forward of the recomputed (checkpointed) share `fraction` of the decoder layers, run again in the
    backward pass: 2 per weight and token, causal attention's forward, a third of the delta rule's. An upper
    bound by each layer's last matmul, which PyTorch's non-reentrant checkpoint does not rerun (nothing saves
    its output): down_proj when trained, its adapter's B for LoRA (tests/integration/test_flops.py)."""
    tokens = sequences * length
    body = 2 * (shape.active_linear_params() + shape.router_params() + adapter_params)
    attention = shape.attention_layers * 2 * length * shape.heads * shape.head_dim
    return float(fraction * tokens * (body + attention + gdn_flops_per_token(shape) / 3))


def hardware_flops(
    shape: Shape,
    method: str,
    length: int,
    sequences: int,
    learned: int,
    adapter_params: int = 0,
    fraction: float = 1.0,
) -> float:
    """`step_flops` plus the recomputation of `fraction` of the layers (gradient checkpointing): for HFU."""
    return step_flops(shape, method, length, sequences, learned, adapter_params) + recompute_flops(
        shape, length, sequences, adapter_params, fraction
    )


def torchtitan_flops(shape: Shape, length: int, sequences: int) -> float:
    """torchtitan's per-token count times the tokens: 6 x non-embedding parameters (top-k experts for a
    mixture) + 12 x attention layers x q_width x L, whatever is trained or learned."""
    embedding = shape.vocab * shape.hidden
    dense = (
        shape.params() - embedding - (shape.moe.idle_params(shape.hidden) if shape.moe else 0) - shape.frozen_params
    )
    attention = 12 * shape.attention_layers * shape.heads * shape.head_dim * length
    return float(sequences * length * (6 * dense + attention))


def gdn_flops_per_token(shape: Shape) -> float:
    """Forward + backward FLOPs per token of the chunked delta rule over every Gated DeltaNet layer
    (3x the forward): per value head, the state read and update (4 k_dim x v_dim) and the in-chunk
    attention over 64 tokens (2 x 64 x (k_dim + v_dim)). The projections are in `linear_params`."""
    from qwen_ft.model.shape import GDN_CHUNK

    g = shape.gdn
    if g is None:
        return 0.0
    return 3.0 * g.layers * g.v_heads * (4 * g.k_dim * g.v_dim + 2 * GDN_CHUNK * (g.k_dim + g.v_dim))


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    """Achieved / peak FLOPs, or None without a known peak."""
    if not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)
