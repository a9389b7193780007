"""What the training loop talks to: a backend, a loss function, a saver and a logger.

The loop (train/loop.py) only sees these interfaces; recipe/steps.py picks the implementations
(TorchBackend or DeepSpeedBackend in train/backends.py; causal_lm_loss or ChunkedLoss in
train/loss.py; the closure `steps.saver` returns; RunLogger in train/logging.py, or the
benchmark's ClockLogger).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from qwen_ft.train.checkpoint import TrainState
    from qwen_ft.train.distributed import DistInfo


class Backend(Protocol):
    """How gradients are synchronised, clipped, stepped and saved with the resume state."""

    @property
    def module(self) -> torch.nn.Module:
        """What the training forward runs through: the model, its DDP wrapper or the DeepSpeed engine."""
        ...

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The model itself (what evaluation runs and what is saved)."""
        ...

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose param groups carry the learning rate."""
        ...

    def accumulating(self, last: bool, /) -> AbstractContextManager[None]:
        """Around the forward and backward of one micro-batch; `last` closes the accumulation group."""
        ...

    def autocast(self) -> AbstractContextManager[object]:
        """Around each forward: mixed precision where the backend does not cast the module itself."""
        ...

    def lora_inputs_uncast(self) -> AbstractContextManager[object]:
        """Around a whole group (forward and backward): peft's fp32 cast of LoRA inputs off under autocast."""
        ...

    def backward(self, loss: torch.Tensor, /) -> None:
        """Backward of an already normalised loss."""
        ...

    def clip(self) -> float:
        """Clip the accumulated gradients; their norm before clipping (0.0 where only `step` knows it)."""
        ...

    def tolerates_inf_norm(self) -> bool:
        """Whether a non-finite gradient norm is expected (fp16 loss scaling skips such steps)."""
        ...

    def step(self, grad_norm: float, /) -> float:
        """Optimizer step and zeroed gradients; returns the step's gradient norm."""
        ...

    def discard(self) -> None:
        """Drop the accumulated gradients without stepping."""
        ...

    def saved_state_dict(self, method: str, /) -> dict[str, torch.Tensor] | None:
        """The weights to save (gathered under ZeRO-3; every rank calls it), or None: the model's own."""
        ...

    def save_state(self, out: Path, state: TrainState, is_main: bool, /) -> None:
        """Write the resume state (optimizer, RNG, TrainState) into checkpoint directory `out`."""
        ...

    def load_state(self, ckpt: Path, method: str, /) -> TrainState:
        """Restore weights, optimizer and RNG from checkpoint `ckpt`; returns its TrainState."""
        ...


class LossFn(Protocol):
    """(model, collated batch) -> (summed next-token loss over learned labels, number of learned labels)."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], /) -> tuple[torch.Tensor, int]: ...


class Saver(Protocol):
    """Writes the model (weights, config, manifest, tokenizer files) into a directory; run on every rank."""

    def __call__(self, out: Path, /) -> None: ...


class StepLogger(Protocol):
    """Receives every optimizer step's metrics and every eval loss (main-process output is its business)."""

    def step(self, step: int, metrics: dict[str, float], /) -> None: ...

    def eval(self, step: int, loss: float, /) -> None: ...


class SavedRun(Protocol):
    """What a checkpoint save reads of the training run (loop.TrainingRun)."""

    dist: DistInfo
    backend: Backend
    save_fn: Saver
