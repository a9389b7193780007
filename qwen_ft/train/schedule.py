"""AdamW and the learning-rate schedule (linear warmup, then cosine, linear or constant).

The schedule is a pure function of the step, applied to the optimizer before every step, so
resuming needs no scheduler state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from qwen_ft.config.schema import TrainConfig


def lr_at(step: int, peak: float, total: int, warmup: int, kind: str) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warmup rises linearly to `peak` over `warmup` steps ((step+1)/warmup, so step 0 already
    learns); then `cosine` decays as peak * 0.5 * (1 + cos(pi * p)), `linear` as peak * (1 - p),
    with p = (step - warmup) / (total - warmup); `constant` stays at peak.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model, train: TrainConfig) -> list[dict]:
    """Trainable parameters in two groups: weight decay on matrices, none on biases, norms and other 1-d tensors.

    Under ZeRO-3 a parameter's local tensor is empty; its real rank is in `ds_shape`.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))
            (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, train: TrainConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups(model, train)`: DeepSpeed's CPU AdamW when ZeRO offloads the optimizer,
    else torch's, with the fused kernel when every trained tensor is on a GPU (one launch per step
    instead of several per tensor); with train.adam_moments_on_host its moments wait in host memory
    between steps (train/host_adam.py)."""
    groups = param_groups(model, train)
    hyper: dict[str, Any] = {"lr": train.learning_rate, "betas": (0.9, train.adam_beta2), "eps": 1e-8}
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **hyper)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    if train.adam_moments_on_host:
        from qwen_ft.train.host_adam import HostAdamW

        return HostAdamW(groups, fused=on_cuda or None, **hyper)
    return torch.optim.AdamW(groups, fused=on_cuda or None, **hyper)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply `lr` to every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
