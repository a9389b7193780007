"""RunPlan: derived, runtime-only values (device, precision, step counts). Never written back to the config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qwen_ft.errors import QwenFtError
from qwen_ft.model.load import Precision

if TYPE_CHECKING:
    from qwen_ft.config.schema import TrainConfig


@dataclass(frozen=True)
class RunPlan:
    """What this run will do, derived from config + data + world size."""

    device: torch.device
    precision: Precision
    attn: str
    world: int
    micro_batches_per_epoch: int  # per process
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    segments: bool = False  # packed batches carry per-example indices for Gated DeltaNet layers


def rank_batches(batches: list, rank: int, world: int) -> list:
    """This rank's micro-batches: an equal share for every rank (the remainder is counted by the caller)."""
    even = len(batches) // world * world
    return batches[rank:even:world]


def make_run_plan(
    t: TrainConfig,
    device: torch.device,
    precision: Precision,
    attn: str,
    world: int,
    n_batches: int,
    segments: bool = False,
) -> RunPlan:
    """Step counts from the number of planned micro-batches of one epoch.

    Raises:
        QwenFtError: fewer micro-batches than processes.
    """
    per_rank = n_batches // world
    if per_rank == 0:
        raise QwenFtError(
            f"{n_batches} micro-batch(es) for {world} processes; add data, lower "
            "train.micro_batch_size, or use fewer processes"
        )
    steps_per_epoch = math.ceil(per_rank / t.grad_accum)
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    warmup = math.ceil(t.warmup_ratio * total)
    return RunPlan(device, precision, attn, world, per_rank, steps_per_epoch, total, warmup, segments)
