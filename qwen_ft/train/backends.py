"""How gradients are synchronised, stepped and saved: plain/DDP (torch) or DeepSpeed ZeRO.

The loop only talks to a backend (the `Backend` protocol, train/protocols.py): `accumulating`
around each micro-batch, `backward`, `clip` (the gradient norm before the step, where the
backend can know it), `step`, and the resume-state save/load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwen_ft.train import checkpoint as ck

if TYPE_CHECKING:
    from qwen_ft.model.load import Precision


class TorchBackend:
    """One process or DDP: GradScaler for fp16, clipping before the step, safetensors resume state."""

    def __init__(
        self,
        model: torch.nn.Module,
        unwrapped: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        device: torch.device,
        max_grad_norm: float,
        rank: int = 0,
    ):
        self.module, self.unwrapped, self.optimizer, self.rank = model, unwrapped, optimizer, rank
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")
        self.max_grad_norm = max_grad_norm or float("inf")
        self.autocast_dtype = None if precision.name == "fp32" else precision.dtype
        self.device = device

    @contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Forward+backward of one micro-batch; DDP synchronises gradients only on the last."""
        ddp = self.module if isinstance(self.module, torch.nn.parallel.DistributedDataParallel) else None
        with nullcontext() if last or ddp is None else ddp.no_sync():
            yield

    def autocast(self) -> AbstractContextManager[object]:
        """bf16/fp16 autocast, nothing in fp32."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def lora_inputs_uncast(self) -> AbstractContextManager[object]:
        """Around forward *and* backward (checkpointed layers recompute inside backward): peft's cast
        of every LoRA input to the adapters' fp32 is off while autocast is on. Autocast casts the
        matmul operands back to bf16/fp16 anyway, so the cast only cost a full fp32 copy (and fp32
        dropout) of each adapted layer's input. The fp32 master weights stay."""
        if self.autocast_dtype is None:
            return nullcontext()
        from qwen_ft.model.adapters import lora_input_casting_off

        return lora_input_casting_off(self.unwrapped)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def clip(self) -> float:
        """Unscale and clip; returns the gradient norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        return float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))

    def tolerates_inf_norm(self) -> bool:
        """fp16 loss scaling skips steps with inf gradients by design."""
        return self.scaler.is_enabled()

    def step(self, grad_norm: float) -> float:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def discard(self) -> None:
        """Drop accumulated gradients without stepping."""
        self.optimizer.zero_grad(set_to_none=True)

    def saved_state_dict(self, method: str) -> dict[str, torch.Tensor] | None:
        """None: the unwrapped model holds whole weights, save them as they are."""
        return None

    def save_state(self, out: Path, state: ck.TrainState, is_main: bool) -> None:
        """The main process writes the optimizer, its RNG and the TrainState; the others their own RNG."""
        if is_main:
            ck.save_resume_state(out, state, self.optimizer)
        else:
            ck.save_rank_rng(out, self.rank)

    def load_state(self, ckpt: Path, method: str) -> ck.TrainState:
        from qwen_ft.model.build import load_trained_weights

        state = ck.load_resume_state(ckpt, self.optimizer)
        if self.rank:
            ck.load_rank_rng(ckpt, self.rank)
        load_trained_weights(self.unwrapped, ckpt, method)
        return state


class DeepSpeedBackend:
    """A DeepSpeed engine: ZeRO partitions, clipping inside `engine.step()`, its own checkpoint format."""

    def __init__(self, engine: Any, unwrapped: torch.nn.Module, rank: int):  # engine: deepspeed.DeepSpeedEngine
        self.module = self.engine = engine
        self.unwrapped, self.optimizer, self.rank = unwrapped, engine.optimizer, rank

    @contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Tell the engine where the accumulation boundary is (our groups may be shorter at epoch ends)."""
        self.engine.set_gradient_accumulation_boundary(last)
        yield

    def autocast(self) -> AbstractContextManager[object]:
        return nullcontext()  # DeepSpeed casts the module itself for bf16/fp16

    def lora_inputs_uncast(self) -> AbstractContextManager[object]:
        return nullcontext()  # no autocast here: peft's cast is what makes the dtypes meet

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already normalised per group

    def clip(self) -> float:
        return 0.0  # known only after engine.step(); checked there

    def tolerates_inf_norm(self) -> bool:
        return bool(self.engine.fp16_enabled())

    def step(self, _unused: float) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def discard(self) -> None:
        self.engine.zero_grad()

    def saved_state_dict(self, method: str) -> dict[str, torch.Tensor] | None:
        """The weights to save, gathered from ZeRO-3 partitions (every rank must call this)."""
        from qwen_ft.train.deepspeed import gathered_state_dict

        return gathered_state_dict(self.engine, self.unwrapped, method)

    def save_state(self, out: Path, state: ck.TrainState, is_main: bool) -> None:
        """DeepSpeed's partitioned checkpoint (every rank), per-rank RNG, and the TrainState."""
        self.engine.save_checkpoint(str(out / "deepspeed"), tag="state", save_latest=False)
        ck.save_rank_rng(out, self.rank)
        if is_main:
            ck.write_state_json(out, state)

    def load_state(self, ckpt: Path, method: str) -> ck.TrainState:
        """Restore weights, optimizer partitions and RNG (DeepSpeed's files are torch pickles it wrote itself)."""
        self.engine.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_lr_scheduler_states=False)
        ck.load_rank_rng(ckpt, self.rank)
        return ck.read_state(ckpt)
