"""The memory estimate of a whole run: the sections of a RunConfig composed into what `sizing/memory.py`
reads (a Workload), against the checkpoint's config.json."""

from __future__ import annotations

from qwen_ft.config.schema import RunConfig
from qwen_ft.model.shape import Shape
from qwen_ft.sizing.memory import Estimate, RunEstimate, Workload, estimate_peak, read_checkpoint_config


def workload_of(cfg: RunConfig) -> Workload:
    """What the estimate reads of `cfg`."""
    return Workload(
        cfg.method_spec,
        cfg.train.micro_batch_size,
        cfg.data.max_length,
        cfg.model.recomputed_fraction,
        cfg.train.loss_chunk_tokens,
        cfg.dist.deepspeed != "none",
        cfg.model.host_embedding,
    )


def peak_of(
    cfg: RunConfig, shape: Shape, dtype: str, world: int, stage: int, offload: bool, gptq_group: int = 128
) -> Estimate:
    """`sizing.memory.estimate_peak` of a run config."""
    return estimate_peak(workload_of(cfg), shape, dtype, world, stage, offload, gptq_group)


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
