"""The memory estimate of a whole run: the sections of a RunConfig composed into what `sizing/memory.py`
reads (a Workload), against the checkpoint's config.json."""

from __future__ import annotations

from qwen_ft.config.schema import RunConfig
from qwen_ft.model.shape import Shape
from qwen_ft.sizing.memory import GB, Estimate, RunEstimate, Workload, estimate_peak, read_checkpoint_config


def workload_of(cfg: RunConfig) -> Workload:
    """What the estimate reads of `cfg`."""
    dropped = cfg.method != "full" and not cfg.model.fused_lora and _lora_dropout(cfg) > 0
    return Workload(
        cfg.method_spec,
        cfg.train.micro_batch_size,
        cfg.data.max_length,
        cfg.model.recomputed_fraction,
        cfg.train.loss_chunk_tokens,
        cfg.dist.deepspeed != "none",
        cfg.model.host_embedding,
        cfg.train.adam_moments_on_host,
        cfg.model.offload_checkpoint_inputs,
        dropped,
    )


def _lora_dropout(cfg: RunConfig) -> float:
    """lora.dropout, or the family's default for the checkpoint at model.path (0 where none is readable: a shape
    given to `peak_of` directly)."""
    from qwen_ft.errors import QwenFtError
    from qwen_ft.model.adapters import lora_dropout
    from qwen_ft.model.families import resolve_family

    if cfg.lora.dropout is not None:
        return cfg.lora.dropout
    try:
        return lora_dropout(cfg.lora, resolve_family(cfg.model.family, cfg.model.path))
    except QwenFtError:
        return 0.0


def peak_of(
    cfg: RunConfig, shape: Shape, dtype: str, world: int, stage: int, offload: bool, gptq_group: int = 128
) -> Estimate:
    """`sizing.memory.estimate_peak` of a run config."""
    return estimate_peak(workload_of(cfg), shape, dtype, world, stage, offload, gptq_group)


def layers_for_budget(cfg: RunConfig, budget_gib: float, gpus: int = 1, dtype: str = "bf16") -> tuple[int, int, float]:
    """(recomputed layers, all layers, estimated peak GiB): the fewest decoder layers recomputed whose estimate
    fits `budget_gib` per GPU.

    Raises:
        QwenFtError: the estimate does not fit even with every layer recomputed.
    """
    from qwen_ft.errors import QwenFtError

    layers = Shape.from_config(read_checkpoint_config(cfg.model.path)).layers
    peak = 0.0
    for k in range(layers + 1):
        peak = estimate_run(recomputing(cfg, k, layers), gpus, dtype).estimate.total / GB
        if peak <= budget_gib:
            return k, layers, peak
    raise QwenFtError(
        f"model.memory_budget_gib: {budget_gib} GiB, but the estimate is {peak:.2f} GiB per GPU even recomputing "
        f"every one of the {layers} layers; raise the budget, or lower data.max_length or train.micro_batch_size"
    )


def recomputing(cfg: RunConfig, k: int, layers: int) -> RunConfig:
    """`cfg` with its first `k` of `layers` decoder layers recomputed (none: checkpointing off)."""
    import dataclasses

    model = dataclasses.replace(cfg.model, gradient_checkpointing=k > 0, checkpoint_fraction=k / layers or 1.0)
    return dataclasses.replace(cfg, model=model)


def estimate_run(cfg: RunConfig, gpus: int = 1, dtype: str = "bf16") -> RunEstimate:
    """Peak memory per GPU for `cfg` on `gpus` GPUs; `dtype` is what model.dtype=auto becomes.

    Raises:
        QwenFtError: model.path has no readable config.json.
    """
    from qwen_ft.train.ds_config import deepspeed_config, offloads_optimizer, zero_stage

    checkpoint_config = read_checkpoint_config(cfg.model.path)
    shape = Shape.from_config(checkpoint_config)
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else dtype
    ds = deepspeed_config(cfg.dist, cfg.train, dtype, gpus) if cfg.dist.deepspeed != "none" else {}
    group = checkpoint_config.get("quantization_config", {}).get("group_size") or 128
    group = group if group > 0 else 1 << 30  # -1: one group spans each column's whole input
    e = peak_of(cfg, shape, dtype, gpus, zero_stage(ds), offloads_optimizer(ds), gptq_group=group)
    return RunEstimate(shape, cfg.method, dtype, gpus, zero_stage(ds), offloads_optimizer(ds), e)
