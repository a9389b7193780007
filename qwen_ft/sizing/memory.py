"""Peak GPU memory per process, predicted from the run config and the checkpoint's config.json.

A first-order model: exact parameter counts; weights (GPTQ: packed weights, zeros, scales and
g_idx per layer), gradients and AdamW states by dtype and method; ZeRO partitioning and offload;
activations that live through the whole forward (layer inputs when checkpointed, Korthikanti et
al.'s ~34*H bytes per token per layer in 16-bit with flash/SDPA attention otherwise). On top
come two moments that never overlap, so the larger counts, not the sum: the loss step (one
chunk of logits plus autocast's cached low-precision copies of fp32 weights) and the backward
replay of one checkpointed layer. Checked on one H100 (2026-11-22, 7B LoRA 2048/8192 and Q-LoRA
bnb/GPTQ 2048): within 15% of every measured peak (`qwen-ft bench` reports the error per case).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qwen_ft.model.load import checkpointed_layers
from qwen_ft.model.shape import Shape, lora_params, nf4_bytes_per_weight

if TYPE_CHECKING:
    from qwen_ft.config.schema import MethodSpec, QuantConfig

GB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Estimate:
    """Bytes per component on one GPU: `parts` are held together; of the `moments`, which never
    overlap, only the largest adds to the peak."""

    parts: dict[str, float] = field(default_factory=dict)
    moments: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values()) + max(self.moments.values(), default=0.0)


def trainable_params(method: MethodSpec, shape: Shape) -> int:
    """Parameters the optimizer updates."""
    if method.name == "full":
        return shape.params() - shape.frozen_params  # a vision tower is held, not trained
    lo = method.lora
    emb = (1 if shape.tied else 2) * shape.vocab * shape.hidden if lo.train_embeddings else 0
    return lora_params(shape, lo.r, lo.target_modules) + emb


def weight_bytes(method: MethodSpec, deepspeed: bool, shape: Shape, dtype: str, gptq_group: int = 128) -> float:
    """Model weights as held on the GPU (`deepspeed`: DeepSpeed holds the module in `dtype`)."""
    if method.name == "qlora":
        return quantized_linear_bytes(method.quant, shape, gptq_group) + shape.other_params() * BYTES[dtype]
    if method.name == "full" and not deepspeed:
        return shape.params() * 4.0  # fp32 master weights, autocast forward
    return shape.params() * BYTES[dtype]


def quantized_linear_bytes(quant: QuantConfig, shape: Shape, gptq_group: int) -> float:
    """The decoder's linear layers quantized. bitsandbytes: 4-bit codes plus an fp32 absmax per 64
    weights, or with double quantization an 8-bit absmax per 64 and an fp32 scale per 256 of those.
    GPTQ: packed codes, packed zeros and fp16 scales per group of each output column, int32 g_idx
    per input row."""
    if quant.backend == "bnb":
        return shape.linear_params() * nf4_bytes_per_weight(quant.double_quant)
    code = quant.bits / 8

    def packed(i: int, o: int) -> float:
        return i * o * code + -(-i // gptq_group) * o * (code + 2) + i * 4

    dense = sum(n * sum(packed(i, o) for i, o in shapes.values()) for n, shapes in shape.layer_groups())
    m = shape.moe  # routed experts: per-expert quantized linears (gate, up: H -> I; down: I -> H)
    return dense + (
        m.layers * m.experts * (2 * packed(shape.hidden, m.intermediate) + packed(m.intermediate, shape.hidden))
        if m
        else 0
    )


# Bytes per logit entry at the loss step's peak (fp32 logits, their softmax/gradient and the 16-bit
# matmul output): the fused chunked loss, from the H100 7B LoRA 2048 peak (11); the plain loss, from
# CPU measurements (13: 12.6-13.7 with vocab 151,936, chunks of 512/1024, fp32 and bf16 autocast).
LOGIT_BYTES = {"fused": 11, "plain": 13}


@dataclass(frozen=True)
class Workload:
    """What the estimate reads of a run (composed from a RunConfig by recipe/estimate.py): the method, a
    micro-batch's rows and length, the share of layers recomputed, the loss's chunking, and whether
    DeepSpeed holds the weights."""

    method: MethodSpec
    micro_batch_size: int
    max_length: int
    recomputed_fraction: float
    loss_chunk_tokens: int
    deepspeed: bool
    host_embedding: bool = False  # model.host_embedding: the input embedding in host memory
    moments_on_host: bool = False  # train.adam_moments_on_host: on the device only during the step
    inputs_on_host: bool = False  # model.offload_checkpoint_inputs: recomputed layers' inputs in host memory
    dropped_copies: bool = False  # LoRA dropout > 0 through peft's forward (not model.fused_lora): kept inputs


def estimate_peak(
    work: Workload, shape: Shape, dtype: str, world: int, stage: int, offload: bool, gptq_group: int = 128
) -> Estimate:
    """Predicted peak bytes per GPU for `work` on `world` GPUs under ZeRO `stage` (0: none)."""
    t = trainable_params(work.method, shape)
    full_ds = work.method.name == "full" and stage > 0
    grad_bytes = BYTES[dtype] if full_ds else 4  # adapters and plain full training keep fp32 grads
    optim = t * (8 + (4 if full_ds and dtype != "fp32" else 0))  # Adam moments (+ fp32 master under DS)
    e = Estimate()
    held = weight_bytes(work.method, work.deepspeed, shape, dtype, gptq_group)
    held -= shape.vocab * shape.hidden * BYTES[dtype] if work.host_embedding else 0
    e.parts["weights"] = held / (world if stage == 3 else 1)
    if work.method.name != "full":  # fp32 LoRA weights and, for LoRA (emb), the fp32 trained copies of embeddings/head
        e.parts["trained fp32"] = t * 4.0 / (world if stage == 3 else 1)
    e.parts["gradients"] = t * grad_bytes / (world if stage >= 2 else 1)
    e.parts["optimizer"] = 0.0 if offload or work.moments_on_host else optim / (world if stage >= 1 else 1)
    if work.moments_on_host:  # brought in for the step, when activations and logits are gone
        e.moments["optimizer step"] = optim
    tokens = work.micro_batch_size * work.max_length
    # bytes per token per layer, 16-bit activations (already in bytes), and the adapters' dropped inputs
    per_layer = 34 * shape.hidden + (dropped_input_bytes(work.method, shape) if work.dropped_copies else 0)
    recomputed = checkpointed_layers(shape.layers, work.recomputed_fraction)
    # Recomputed layers keep their input only; the others all their activations. With the inputs in host memory,
    # an adapter run still holds the first: its embedding output is a leaf that requires grad (model/offload.py),
    # or with model.host_embedding the batch's inputs_embeds, which the loop holds through the step.
    kept_inputs = (work.method.name != "full" and recomputed > 0) if work.inputs_on_host else recomputed
    e.parts["activations"] = tokens * (kept_inputs * shape.hidden * 2 + (shape.layers - recomputed) * per_layer)
    if shape.moe and recomputed < shape.layers:  # the routed copies of each token: top-k active experts
        e.parts["expert activations"] = (
            tokens * expert_activation_bytes(shape) * (shape.layers - recomputed) * shape.moe.layers / shape.layers
        )
    # per GDN layer, kept like its other activations
    states = gdn_chunk_states(work.max_length, work.micro_batch_size, shape)
    if shape.gdn and recomputed < shape.layers:
        e.parts["GDN states"] = states * shape.gdn.layers * (1 - recomputed / shape.layers)
    e.moments["loss step"] = _loss_step_bytes(work.loss_chunk_tokens, work.method, shape, dtype, stage, tokens, t)
    if recomputed:  # one layer's activations while backward replays it (and its input and the next, fetched)
        e.moments["layer replay"] = tokens * (per_layer + (4 * shape.hidden if work.inputs_on_host else 0)) + states
    return e


# Bytes per adapted input element that peft's LoRA dropout adds to a layer's saved activations: its mask and the
# dropped copy the adapter's matmul keeps (from the 7B LoRA 8192 ledger, tests/integration/test_memory_ledger.py:
# dropout 0.05 against 0 adds 1.42 GiB to the peak, 5.2 bytes per element of the layer's 6 H + I adapted inputs).
DROPOUT_BYTES = 5


def dropped_input_bytes(method: MethodSpec, shape: Shape) -> float:
    """Bytes per token per decoder layer of the LoRA dropout's kept copies: one per adapted linear layer's input."""
    chosen = set(method.lora.target_modules or shape.linear_shapes())
    inputs = sum(n * sum(i for name, (i, _) in shapes.items() if name in chosen) for n, shapes in shape.layer_groups())
    return DROPOUT_BYTES * inputs / shape.layers


def expert_activation_bytes(shape: Shape) -> int:
    """16-bit bytes per token per sparse layer kept for backward by the routed experts: each of the
    top-k copies holds its input, gate/up output, activation and down output (H + 2I + I + H)."""
    m = shape.moe
    return 0 if m is None else m.top_k * 2 * (2 * shape.hidden + 3 * m.intermediate)


def gdn_chunk_states(max_length: int, rows: int, shape: Shape) -> float:
    """Bytes of one Gated DeltaNet layer's recurrent states kept for backward: the chunked delta rule
    holds an fp32 state per 64-token chunk of each of the micro-batch's `rows` (a [v_heads, k_dim, v_dim]
    matrix each)."""
    from qwen_ft.model.shape import GDN_CHUNK

    if shape.gdn is None:
        return 0.0
    chunks = -(-max_length // GDN_CHUNK)
    return float(rows * chunks * shape.gdn.state_bytes())


def _loss_step_bytes(
    chunk_tokens: int, method: MethodSpec, shape: Shape, dtype: str, stage: int, tokens: int, trained: int
) -> float:
    """One chunk of logits (train.loss_chunk_tokens), plus autocast's cache of 16-bit copies of the fp32
    weights it used."""
    chunked = chunk_tokens and stage != 3
    rows = min(chunk_tokens, tokens) if chunked else tokens
    logits = rows * shape.vocab * LOGIT_BYTES["fused" if chunked else "plain"]
    if chunked:  # the fused loss keeps d/d hidden of every learned position (and d/d head, fp32, when trained)
        head_trained = method.name == "full" or method.lora.train_embeddings
        logits += tokens * shape.hidden * BYTES[dtype] + (shape.vocab * shape.hidden * 4 if head_trained else 0)
    if dtype == "fp32" or stage > 0:  # no autocast (DeepSpeed casts the module itself)
        return logits
    fp32_weights = shape.params() if method.name == "full" else trained
    return logits + fp32_weights * 2


def fits(e: Estimate, gpu_gb: float) -> bool:
    """True when the estimate leaves ~5% headroom for the allocator and CUDA workspace."""
    return e.total <= 0.95 * gpu_gb * GB


@dataclass(frozen=True)
class RunEstimate:
    """The estimate of a run config against its checkpoint's config.json (recipe/estimate.py)."""

    shape: Shape
    method: str
    dtype: str
    gpus: int
    stage: int
    offload: bool
    estimate: Estimate


def read_checkpoint_config(model_path: str) -> dict:
    """config.json of a checkpoint directory.

    Raises:
        QwenFtError: naming the file and the fix.
    """
    import json
    from pathlib import Path

    from qwen_ft.errors import QwenFtError

    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise QwenFtError(
            f"{path} not found: the estimate reads the checkpoint's config.json; set "
            "model.path=DIR to a directory holding it (config.json alone is enough)"
        )
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise QwenFtError(f"{path} is not valid JSON ({e}); restore the checkpoint's config.json") from None
