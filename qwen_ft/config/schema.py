"""The run config: one frozen dataclass per stage; the YAML mirrors this tree.

Every field has a default and a help string (`metadata["help"]`). `Literal` types list the
allowed values; the loader checks and coerces them, so downstream code reads typed fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# preference objectives that compare the policy with a reference model
REFERENCE_OBJECTIVES = ("dpo", "kto")

# Qwen v1 ChatML's default system prompt (QwenLM finetune.py, chat demos).
DEFAULT_SYSTEM = "You are a helpful assistant."


def opt(default, help: str, **kw):  # noqa: A002 - "help" mirrors argparse/TRL naming
    """A dataclass field with a default and a one-line help string."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ModelConfig:
    """The base checkpoint."""

    path: str = opt("", "local checkpoint directory (config.json + weights); never a hub id")
    family: Literal[
        "auto",
        "qwen",
        "qwen2",
        "qwen3",
        "qwen3_5",
        "qwen3_5_text",
        "qwen2_moe",
        "qwen3_moe",
        "qwen3_next",
        "qwen3_5_moe",
        "qwen3_5_moe_text",
    ] = opt("auto", "model family; auto reads model_type from the checkpoint's config.json (never the path)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU"
    )
    attn_implementation: Literal["auto", "flash_attention_2", "varlen", "sdpa", "eager"] = opt(
        "auto",
        "auto: on a GPU flash-attention 2 when it works, else torch's varlen flash attention, else sdpa; "
        "sdpa on CPU. varlen/flash_attention_2 train each micro-batch as one padding-free row",
    )
    gradient_checkpointing: bool = opt(True, "non-reentrant activation checkpointing")
    checkpoint_fraction: float = opt(
        1.0,
        "with gradient_checkpointing: share of decoder layers recomputed in backward; lower trades memory "
        "for speed (qwen-ft estimate shows the memory)",
    )
    memory_budget_gib: float | None = opt(
        None,
        "with gradient_checkpointing: recompute only as many decoder layers (the first ones) as keep qwen-ft "
        "estimate's peak per GPU within this many GiB, the others keeping their activations (faster); replaces "
        "checkpoint_fraction, and a run that does not fit even recomputing every layer is refused",
    )
    compile: bool = opt(
        False,
        "torch.compile each decoder layer: fewer, fused kernels (the step is host-bound without it on "
        "GPUs); the first steps pay the compilation. Not with method=qlora or ZeRO-3",
    )
    fused_lora: bool = opt(
        False,
        "LoRA layers as one autograd function (qwen_ft/model/fused_lora.py): peft's loss and gradients without "
        "a dropped copy of each adapted layer's input kept for backward. method=lora on a plain base only, not "
        "with model.compile or ZeRO-3; off by default until timed on a GPU (scripts/gpu_perf.sh)",
    )
    host_embedding: bool = opt(
        False,
        "keep the frozen input embedding in host memory and look rows up there, with the batch "
        "(qwen_ft/model/host_embedding.py): 1.16 GiB of a 7B model's GPU memory, the same steps. LoRA/Q-LoRA "
        "SFT on an untied, text-only checkpoint; not with trained embeddings or ZeRO-3",
    )
    offload_checkpoint_inputs: bool = opt(
        False,
        "with gradient_checkpointing: keep each recomputed layer's input in pinned host memory from its forward to "
        "its recomputation (qwen_ft/model/offload.py): 0.97 GiB of a 7B LoRA micro-batch of 2 x 2048 tokens, the "
        "same steps; copies overlap compute on a side stream. Not with model.compile",
    )
    adapter: str | None = opt(
        None,
        "a LoRA adapter directory (a qwen-ft or peft output, safetensors) to start from, e.g. the SFT adapter a "
        "preference stage continues: its rank, alpha and targets are the run's, and for dpo the reference is this "
        "adapter, frozen",
    )
    trust_remote_code: bool = opt(False, "run code shipped with the checkpoint; off unless you ask for it")
    allow_pickle_weights: bool = opt(
        False,
        "load .bin (torch pickle) weights when a checkpoint has no safetensors; off: refused, since "
        "unpickling can run code",
    )

    @property
    def recomputed_fraction(self) -> float:
        """Share of decoder layers recomputed in backward: checkpoint_fraction, or 0 without checkpointing."""
        return self.checkpoint_fraction if self.gradient_checkpointing else 0.0


@dataclass(frozen=True)
class TokenizerConfig:
    """Where the tokenizer lives (qwen.tiktoken for Qwen v1, tokenizer.json for Qwen2/2.5/3)."""

    path: str | None = opt(None, "tokenizer directory; defaults to model.path")


@dataclass(frozen=True)
class DataConfig:
    """Conversation files and how they become training rows."""

    train_files: tuple[str, ...] = opt(
        (),
        "conversation files or directories: .jsonl, .json, .parquet, .arrow, .csv, or a datasets.save_to_disk "
        "directory; OpenAI messages, ShareGPT, Qwen v1, Alpaca or prompt/completion rows (data/README.md)",
    )
    eval_files: tuple[str, ...] = opt((), "held-out conversation files for eval loss")
    eval_fraction: float = opt(0.0, "fraction of train conversations held out for eval when eval_files is empty")
    max_length: int = opt(2048, "maximum tokens per conversation and per packed row")
    overlong: Literal["truncate", "drop"] = opt(
        "truncate", "conversations over max_length: truncate at a turn boundary, or drop (both counted)"
    )
    label_policy: Literal["assistant", "last_turn", "qwen_reference"] = opt(
        "assistant", "which tokens are learned; see qwen_ft/data/template.py"
    )
    chat_template: str | None = opt(
        None,
        "a .jinja file (or tokenizer_config.json) whose chat template renders the data; default: the "
        "tokenizer directory's own (chat_template.jinja or tokenizer_config.json), as servers use",
    )
    template_kwargs: dict[str, Any] = opt(
        {},
        "variables for the chat template on every conversation, e.g. {enable_thinking: false}; a row's own "
        "chat_template_kwargs take precedence",
    )
    default_system: str = opt(
        "",
        "system prompt inserted when a conversation has none; empty: the chat template's own default "
        f"(Qwen v1 ChatML without a template: {DEFAULT_SYSTEM!r})",
    )
    packing: bool = opt(True, "pack conversations into rows of max_length with restarting position_ids")
    on_error: Literal["error", "skip"] = opt("error", "bad rows: stop with every error listed, or skip and count them")
    num_proc: int = opt(1, "tokenization processes")
    cache_dir: str = opt(".cache/qwen-ft", "tokenized-data cache, keyed by data content, tokenizer and settings")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (method: lora or qlora)."""

    r: int = opt(8, "LoRA rank")
    alpha: int = opt(16, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float | None = opt(
        None,
        "dropout on the LoRA input; default 0.05, or 0 when the routed experts of a mixture of experts are "
        "adapted (peft's target_parameters adapters cannot apply dropout; a value > 0 is refused there)",
    )
    target_modules: tuple[str, ...] = opt(
        (),
        "module names to adapt, and on a mixture of experts the parameters mlp.experts.gate_up_proj, "
        "mlp.experts.down_proj (routed experts) and mlp.gate.weight (router); empty: every linear layer of the "
        "family and every routed expert",
    )
    rslora: bool = opt(False, "rank-stabilised scaling")
    dora: bool = opt(False, "weight-decomposed LoRA")
    train_embeddings: bool = opt(False, "also train input embeddings and output layer (Qwen's 'LoRA (emb)')")


@dataclass(frozen=True)
class QuantConfig:
    """Quantized base for method: qlora."""

    backend: Literal["bnb", "gptq"] = opt(
        "bnb", "bnb: quantize on load with bitsandbytes; gptq: an existing GPTQ checkpoint"
    )
    bits: int = opt(4, "weight bits (bnb: 4; gptq: 4 or 8)")
    quant_type: Literal["nf4", "fp4"] = opt("nf4", "bitsandbytes 4-bit data type")
    double_quant: bool = opt(True, "bitsandbytes nested quantization of the scales")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = opt("auto", "dtype of the de-quantized matmuls")
    original_base: str | None = opt(None, "full-precision checkpoint the quantized base came from (used by merge)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and checkpoints."""

    output_dir: str = opt("runs/default", "where checkpoints, logs and the final model go")
    serve_for: tuple[Literal["vllm", "sglang", "llama.cpp", "ollama"], ...] = opt(
        (),
        "the servers the final output is for: its SERVING.md gives their commands, and a setup one of them "
        "would serve wrong (DoRA, trained embeddings, a rank above its limit) is refused before training; "
        "empty: every server, with what each cannot serve said in SERVING.md",
    )
    seed: int = opt(42, "seed for init, data order and dropout")
    epochs: float = opt(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = opt(0, "optimizer steps; 0: derived from epochs")
    micro_batch_size: int = opt(1, "rows per forward pass per process")
    grad_accum: int = opt(8, "micro-batches per optimizer step")
    learning_rate: float = opt(1e-4, "peak learning rate")
    weight_decay: float = opt(0.1, "AdamW weight decay")
    adam_beta2: float = opt(0.95, "AdamW beta2")
    adam_moments_on_host: bool = opt(
        False,
        "keep AdamW's two moments in pinned host memory between steps, on the device only during the step "
        "(qwen_ft/train/host_adam.py): the same steps, a lower training peak (1.19 GiB for 7B LoRA r 64). Not "
        "with DeepSpeed (its own offload: dist.deepspeed=zero2_offload)",
    )
    scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "decay after warmup")
    warmup_ratio: float = opt(0.01, "fraction of steps spent warming up linearly")
    max_grad_norm: float = opt(1.0, "gradient clipping; 0 disables")
    loss_chunk_tokens: int = opt(
        1024, "learned positions per chunk of output layer + cross-entropy (bounds logits memory); 0: all at once"
    )
    loss_kernel: Literal["auto", "liger", "qwen-ft"] = opt(
        "auto",
        "fused output layer + cross-entropy: liger (Liger's Triton kernel; CUDA, liger-kernel), qwen-ft "
        "(loss_chunk_tokens-row chunks, any device) or auto (liger where it runs: the lower peak; qwen-ft's is a "
        "little faster, benchmarks/README.md)",
    )
    router_aux_loss_coef: float | None = opt(
        None,
        "mixture of experts: weight of the router's load-balancing loss (transformers' "
        "load_balancing_loss_func over real tokens, logged as aux_loss); default: the checkpoint's "
        "router_aux_loss_coef; 0 switches it off",
    )
    logging_steps: int = opt(1, "TensorBoard scalars and the bar's loss every N optimizer steps (mean over them)")
    eval_steps: int = opt(0, "eval every N steps; 0: only at the end (when an eval set exists)")
    save_steps: int = opt(0, "checkpoint every N steps; 0: only at the end")
    save_total_limit: int = opt(2, "keep the newest K checkpoints")
    resume: str = opt("none", "none, auto (newest checkpoint in output_dir that verifies), or a checkpoint path")
    resume_data: Literal["continue", "restart"] = opt(
        "continue",
        "on resume: continue the data where the checkpoint stopped (refused when the data changed since), or "
        "restart it from its beginning (new data files allowed; weights, optimizer and step kept)",
    )
    overwrite_output_dir: bool = opt(
        False, "a new run into an output_dir holding another run's outputs clears them first (refused otherwise)"
    )
    collective_timeout: int = opt(
        300,
        "seconds a process waits in a collective (gradient all-reduce, barrier) for the others; past it, or at "
        "once when another process dies, the run stops naming the rank that is gone",
    )


@dataclass(frozen=True)
class PreferenceSettings:
    """The preference objectives (`objective` other than sft), named as TRL names them, with TRL 1.16's defaults."""

    beta: float = opt(0.1, "preference strength: DPO's and KTO's KL weight, SimPO's reward scale, ORPO's lambda")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = opt(
        "sigmoid", "DPO's loss: sigmoid (DPO), ipo, hinge (SLiC) or robust (rDPO)"
    )
    label_smoothing: float = opt(0.0, "robust DPO's and SimPO's assumed rate of flipped labels, in [0, 0.5)")
    simpo_gamma: float = opt(0.5, "SimPO's target reward margin")
    cpo_alpha: float = opt(
        1.0, "SimPO: weight of the chosen completions' NLL added to the loss (TRL's CPO default; 0: the paper's SimPO)"
    )
    precompute_ref: bool = opt(
        False,
        "dpo: compute the reference's log-probs of every pair once before training, kept in the data cache "
        "(keyed by the data and the reference's weights), so a step runs the policy only and a full fine-tune "
        "holds no frozen copy while training",
    )
    desirable_weight: float = opt(1.0, "KTO: weight of the desirable examples' losses")
    undesirable_weight: float = opt(1.0, "KTO: weight of the undesirable examples' losses")


@dataclass(frozen=True)
class DistConfig:
    """Multi-process execution."""

    deepspeed: str = opt("none", "none, zero2, zero3, zero2_offload, zero3_offload, or a path to a DeepSpeed JSON")


@dataclass(frozen=True)
class MethodSpec:
    """What is trained, with the sections that say how: what the model layer and the memory estimate read
    of a run (`RunConfig.method_spec`); not a YAML section of its own."""

    name: Literal["full", "lora", "qlora"]
    lora: LoraSettings
    quant: QuantConfig
    adapter: str | None = None  # model.adapter: the trained adapter starts from it
    reference: bool = False  # the objective compares against a reference (with `adapter`: it, frozen)


@dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run."""

    model: ModelConfig = opt(ModelConfig(), "base checkpoint")
    tokenizer: TokenizerConfig = opt(TokenizerConfig(), "tokenizer location")
    data: DataConfig = opt(DataConfig(), "data files and preprocessing")
    method: Literal["full", "lora", "qlora"] = opt("lora", "what is trained")
    objective: Literal["sft", "dpo", "simpo", "orpo", "kto"] = opt(
        "sft",
        "sft (learn the replies), dpo (chosen over rejected, against a reference), simpo (no reference), orpo "
        "(odds ratio plus the chosen sequences' NLL, no reference), kto (unpaired desirable/undesirable "
        "completions, against a reference)",
    )
    preference: PreferenceSettings = opt(PreferenceSettings(), "preference objective settings")
    lora: LoraSettings = opt(LoraSettings(), "adapter settings")
    quant: QuantConfig = opt(QuantConfig(), "quantized base settings")
    train: TrainConfig = opt(TrainConfig(), "optimisation")
    dist: DistConfig = opt(DistConfig(), "distribution")

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer directory: tokenizer.path, else model.path."""
        return self.tokenizer.path or self.model.path

    @property
    def method_spec(self) -> MethodSpec:
        """`method` with the lora and quant sections, the adapter it starts from and whether it needs a reference."""
        reference = self.objective in REFERENCE_OBJECTIVES
        return MethodSpec(self.method, self.lora, self.quant, self.model.adapter, reference)
