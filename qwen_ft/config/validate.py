"""Cross-field rules for a RunConfig. Pure: returns every problem, mutates nothing.

`validate_config` checks what the config says on its own; the checks against this machine (paths,
optional packages, the DeepSpeed JSON) are composed in `recipe/preflight.py`. All return lists so the
caller can report everything in one go.
"""

from __future__ import annotations

import keyword
from pathlib import Path

from qwen_ft.config.schema import RunConfig

DEEPSPEED_PRESETS = ("none", "zero2", "zero3", "zero2_offload", "zero3_offload")


def _ranges(cfg: RunConfig) -> list[str]:
    d, t, lo, m = cfg.data, cfg.train, cfg.lora, cfg.model
    checks = [
        (
            0.0 < m.checkpoint_fraction <= 1.0,
            f"model.checkpoint_fraction: {m.checkpoint_fraction} must be in "
            "(0, 1]; to recompute nothing set model.gradient_checkpointing=false",
        ),
        (
            m.memory_budget_gib is None or m.memory_budget_gib > 0,
            f"model.memory_budget_gib: {m.memory_budget_gib} must be > 0 GiB (or null: use checkpoint_fraction)",
        ),
        (d.max_length >= 16, f"data.max_length: {d.max_length} is too small; use at least 16 tokens"),
        (0.0 <= d.eval_fraction < 0.5, f"data.eval_fraction: {d.eval_fraction} must be in [0, 0.5)"),
        (d.num_proc >= 1, f"data.num_proc: {d.num_proc} must be >= 1"),
        (t.micro_batch_size >= 1, f"train.micro_batch_size: {t.micro_batch_size} must be >= 1"),
        (t.grad_accum >= 1, f"train.grad_accum: {t.grad_accum} must be >= 1"),
        (t.learning_rate > 0, f"train.learning_rate: {t.learning_rate} must be > 0"),
        (t.max_steps >= 0, f"train.max_steps: {t.max_steps} must be >= 0 (0 derives it from epochs)"),
        (t.max_steps > 0 or t.epochs > 0, f"train.epochs: {t.epochs} must be > 0 when train.max_steps is 0"),
        (0.0 <= t.warmup_ratio < 1.0, f"train.warmup_ratio: {t.warmup_ratio} must be in [0, 1)"),
        (t.weight_decay >= 0, f"train.weight_decay: {t.weight_decay} must be >= 0"),
        (0.0 < t.adam_beta2 < 1.0, f"train.adam_beta2: {t.adam_beta2} must be in (0, 1)"),
        (t.max_grad_norm >= 0, f"train.max_grad_norm: {t.max_grad_norm} must be >= 0 (0 disables clipping)"),
        (t.logging_steps >= 1, f"train.logging_steps: {t.logging_steps} must be >= 1"),
        (t.loss_chunk_tokens >= 0, f"train.loss_chunk_tokens: {t.loss_chunk_tokens} must be >= 0 (0: no chunking)"),
        (t.eval_steps >= 0, f"train.eval_steps: {t.eval_steps} must be >= 0"),
        (t.save_steps >= 0, f"train.save_steps: {t.save_steps} must be >= 0"),
        (t.save_total_limit >= 1, f"train.save_total_limit: {t.save_total_limit} must be >= 1"),
        (t.collective_timeout >= 1, f"train.collective_timeout: {t.collective_timeout} must be >= 1 (seconds)"),
        (lo.r >= 1, f"lora.r: {lo.r} must be >= 1"),
        (lo.alpha > 0, f"lora.alpha: {lo.alpha} must be > 0"),
        (lo.dropout is None or 0.0 <= lo.dropout < 1.0, f"lora.dropout: {lo.dropout} must be in [0, 1)"),
        (
            t.router_aux_loss_coef is None or t.router_aux_loss_coef >= 0,
            f"train.router_aux_loss_coef: {t.router_aux_loss_coef} must be >= 0 (0 switches it off)",
        ),
    ]
    return [msg for ok, msg in checks if not ok] + _finite(cfg)


def _finite(cfg: RunConfig) -> list[str]:
    """inf/nan numbers are refused: an infinite learning rate trains NaN weights, infinite epochs
    end in a traceback, and a NaN passes every range check above."""
    import math

    values = {
        "train.learning_rate": cfg.train.learning_rate,
        "train.epochs": cfg.train.epochs,
        "train.warmup_ratio": cfg.train.warmup_ratio,
        "train.weight_decay": cfg.train.weight_decay,
        "train.adam_beta2": cfg.train.adam_beta2,
        "train.max_grad_norm": cfg.train.max_grad_norm,
        "lora.dropout": cfg.lora.dropout or 0.0,
        "train.router_aux_loss_coef": cfg.train.router_aux_loss_coef or 0.0,
        "data.eval_fraction": cfg.data.eval_fraction,
        "model.checkpoint_fraction": cfg.model.checkpoint_fraction,
        **{
            f"preference.{k}": getattr(cfg.preference, k)
            for k in ("beta", "label_smoothing", "simpo_gamma", "cpo_alpha", "desirable_weight", "undesirable_weight")
        },
    }
    problems = [
        f"{key}: {value} is not a finite number; give a finite value"
        for key, value in values.items()
        if not math.isfinite(value)
    ]
    if cfg.train.seed < 0:
        problems.append(f"train.seed: {cfg.train.seed} must be >= 0 (numpy and torch seeds are unsigned)")
    return problems


def _required(cfg: RunConfig) -> list[str]:
    problems = []
    if not cfg.model.path:
        problems.append("model.path: required; set it to a local checkpoint directory (config.json + weights)")
    if not cfg.data.train_files:
        problems.append("data.train_files: required; list one or more .json/.jsonl conversation files")
    out = cfg.train.output_dir.strip()
    if not out or Path(out).anchor == out:  # "" would write into the working directory; "/" into the root
        problems.append(
            f"train.output_dir: {cfg.train.output_dir!r} is empty or a filesystem root; name a "
            "directory for this run, e.g. runs/my-run"
        )
    return problems


def _combinations(cfg: RunConfig) -> list[str]:
    problems = []
    if cfg.data.eval_files and cfg.data.eval_fraction > 0:
        problems.append(
            "data.eval_files and data.eval_fraction are both set; use one source of eval data (set eval_fraction: 0)"
        )
    q = cfg.quant
    if cfg.method == "qlora" and q.backend == "bnb" and q.bits != 4:
        problems.append(f"quant.bits: {q.bits} with quant.backend=bnb; Q-LoRA with bitsandbytes uses 4 bits")
    if cfg.method == "qlora" and q.backend == "gptq" and q.bits not in (4, 8):
        problems.append(f"quant.bits: {q.bits} with quant.backend=gptq; GPTQ checkpoints here are 4- or 8-bit")
    ds = cfg.dist.deepspeed
    if ds in ("zero3", "zero3_offload"):
        problems += zero3_conflicts(cfg)
    if cfg.model.compile and cfg.method == "qlora":
        problems.append(
            "model.compile: true with method=qlora; the 4-bit kernels are not compiled here, set model.compile: false"
        )
    if cfg.train.loss_kernel == "liger" and cfg.train.loss_chunk_tokens == 0:
        problems.append(
            "train.loss_kernel: liger with train.loss_chunk_tokens: 0, which turns the fused loss off; "
            "set loss_chunk_tokens > 0 or loss_kernel: auto"
        )
    if ds not in DEEPSPEED_PRESETS and not ds.endswith(".json"):
        problems.append(f"dist.deepspeed: {ds!r} is not one of {', '.join(DEEPSPEED_PRESETS)} nor a .json path")
    if cfg.model.adapter and cfg.method == "full":
        problems.append(
            "model.adapter with method: full; an adapter is continued as an adapter: use method: lora or qlora "
            "(or merge it first and fine-tune the merged model)"
        )
    problems += _preference_problems(cfg)
    if cfg.model.fused_lora and (cfg.method != "lora" or cfg.model.compile):
        why = (
            f"method={cfg.method}" if cfg.method != "lora" else "model.compile: true (not traced by torch.compile yet)"
        )
        problems.append(
            f"model.fused_lora: true with {why}; the fused LoRA function covers LoRA on a plain (unquantized) base, "
            "uncompiled: set model.fused_lora: false"
        )
    if cfg.model.offload_checkpoint_inputs and (not cfg.model.gradient_checkpointing or cfg.model.compile):
        why = "model.gradient_checkpointing: false" if not cfg.model.gradient_checkpointing else "model.compile: true"
        problems.append(
            f"model.offload_checkpoint_inputs: true with {why}; it keeps the inputs of eagerly recomputed layers in "
            "host memory (a compiled layer's checkpoint is inside its graph): set offload_checkpoint_inputs: false"
            + (" or gradient_checkpointing: true" if not cfg.model.gradient_checkpointing else "")
        )
    if cfg.train.adam_moments_on_host and cfg.dist.deepspeed != "none":
        problems.append(
            f"train.adam_moments_on_host: true with dist.deepspeed={cfg.dist.deepspeed}; DeepSpeed runs its own "
            "optimizer: use dist.deepspeed=zero2_offload (or zero3_offload) to keep its state in host memory"
        )
    if cfg.model.host_embedding and (cfg.method == "full" or cfg.lora.train_embeddings or cfg.objective != "sft"):
        why = (
            "method=full"
            if cfg.method == "full"
            else "lora.train_embeddings: true"
            if cfg.lora.train_embeddings
            else f"objective={cfg.objective}"
        )
        problems.append(
            f"model.host_embedding: true with {why}; the host embedding serves a frozen embedding in supervised "
            "fine-tuning: set model.host_embedding: false"
        )
    problems += [
        f"data.template_kwargs: {k!r} is not a name a chat template can read; use a variable name such as "
        "enable_thinking"
        for k in cfg.data.template_kwargs
        if not (isinstance(k, str) and k.isidentifier()) or keyword.iskeyword(k) or k in ("true", "false", "none")
    ]
    if cfg.model.trust_remote_code and cfg.model.family not in ("auto", "qwen"):
        problems.append(
            f"model.trust_remote_code: true with model.family={cfg.model.family}; transformers supports this family "
            "natively, set trust_remote_code: false"
        )
    return problems


def _preference_problems(cfg: RunConfig) -> list[str]:
    """What the preference objectives do not run with yet, and their settings' ranges."""
    if cfg.objective == "sft":
        return []
    p, problems = cfg.preference, []
    if p.beta <= 0:
        problems.append(f"preference.beta: {p.beta} must be > 0")
    if not 0.0 <= p.label_smoothing < 0.5:
        problems.append(f"preference.label_smoothing: {p.label_smoothing} must be in [0, 0.5)")
    if p.precompute_ref and cfg.objective != "dpo":
        why = "its KL sequences change with each micro-batch" if cfg.objective == "kto" else "it has no reference"
        problems.append(
            f"preference.precompute_ref: true with objective: {cfg.objective}, where {why}; set precompute_ref: false"
        )
    if p.desirable_weight <= 0 or p.undesirable_weight <= 0:
        problems.append(
            f"preference.desirable_weight: {p.desirable_weight} and undesirable_weight: {p.undesirable_weight} "
            "must both be > 0"
        )
    if cfg.objective == "kto" and not cfg.data.packing and cfg.train.micro_batch_size < 2:
        problems.append(
            "objective: kto with train.micro_batch_size: 1 and data.packing: false; KTO estimates its KL term from "
            "the other examples of a micro-batch, and alone an example is its own estimate (TRL refuses it too): "
            "set micro_batch_size >= 2 or data.packing: true"
        )
    if cfg.dist.deepspeed != "none":
        problems.append(
            f"objective: {cfg.objective} with dist.deepspeed={cfg.dist.deepspeed}; preference tuning runs on one "
            "process or under DDP (dist.deepspeed: none) for now"
        )
    return problems


def zero3_conflicts(cfg: RunConfig) -> list[str]:
    """What ZeRO-3 cannot run (dist.deepspeed is a ZeRO-3 preset or a JSON with stage 3)."""
    ds, problems = cfg.dist.deepspeed, []
    if cfg.method == "qlora" and cfg.quant.backend == "gptq":
        problems.append(
            f"dist.deepspeed={ds} is ZeRO-3 with quant.backend=gptq: ZeRO-3 cannot partition GPTQ's "
            "packed weights; use dist.deepspeed=zero2 (or a stage-2 JSON)"
        )
    if cfg.model.host_embedding:
        problems.append(
            f"model.host_embedding: true with dist.deepspeed={ds}, which is ZeRO-3 (it partitions the embedding); "
            "set model.host_embedding: false or use zero2"
        )
    if cfg.model.fused_lora:
        problems.append(
            f"model.fused_lora: true with dist.deepspeed={ds}, which is ZeRO-3: the fused function reads the base "
            "weight that ZeRO-3 gathers only around the base layer's own forward; set model.fused_lora: false or "
            "use zero2"
        )
    if cfg.train.loss_kernel == "liger":
        problems.append(
            f"train.loss_kernel: liger with dist.deepspeed={ds}, which is ZeRO-3; its output-layer "
            "weights are partitioned outside the forward, set train.loss_kernel: auto or use zero2"
        )
    if cfg.model.compile:
        problems.append(
            f"model.compile: true with dist.deepspeed={ds}, which is ZeRO-3; it gathers weights in "
            "hooks that a compiled layer does not run, set model.compile: false or use zero2"
        )
    return problems


def validate_config(cfg: RunConfig) -> list[str]:
    """Every problem with the config itself (no filesystem or package checks)."""
    return _required(cfg) + _ranges(cfg) + _combinations(cfg)
