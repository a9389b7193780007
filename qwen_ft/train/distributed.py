"""Process-group helpers. State lives in a DistInfo passed around, never in module globals."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

# How long a barrier waits: barriers wait for one process's long work (the main process building the
# tokenized cache, converting a Qwen v1 checkpoint or writing a 70B checkpoint), which takes far longer than
# any collective of a training step may (train.collective_timeout bounds those).
WAIT_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (from torchrun's environment)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    waits: tdist.ProcessGroup | None = None  # `barrier`'s group: gloo, WAIT_TIMEOUT (None: the default group)

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (not local rank 0: on several nodes there are several of those)."""
        return self.rank == 0


def init_distributed(timeout_s: int = 300) -> DistInfo:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; start a process group when there are several processes,
    whose collectives give up after `timeout_s` seconds (train.collective_timeout) instead of torch's default."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    waits = tdist.new_group(backend="gloo", timeout=WAIT_TIMEOUT) if world > 1 else None
    return DistInfo(rank, world, local, device, waits)


def single_process_group(info: DistInfo) -> None:
    """A process group of one for DeepSpeed when the job was not started by torchrun (plain python,
    or torchrun with one process): DeepSpeed needs one, and is told not to create its own. The
    store lives in this process, so no port is opened."""
    if info.world == 1 and not tdist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)  # DeepSpeed reads these, as a launcher would have set them
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)


def print0(info: DistInfo, *args, **kwargs) -> None:
    """print on the main process only."""
    if info.is_main:
        print(*args, **kwargs, flush=True)


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op on one), up to WAIT_TIMEOUT: the others may be saving or tokenizing."""
    if info.world > 1:
        tdist.barrier(group=info.waits)


@contextmanager
def local_main_first(info: DistInfo):
    """Local rank 0 of each node runs the body first (it builds a cache or converts a checkpoint);
    the node's other processes wait, then run it and find the work done. Hand-written rather than
    accelerate's `local_main_process_first` because that needs accelerate's PartialState to own the
    process group, which DeepSpeed and torchrun already set up here."""
    if info.local_rank != 0:
        barrier(info)
    yield
    if info.local_rank == 0:
        barrier(info)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of `values` over all processes."""
    if info.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    tdist.all_reduce(t)
    return t.tolist()


def wrap_ddp(model, info: DistInfo):
    """DistributedDataParallel over the processes (identity on one)."""
    if info.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.local_rank] if info.device.type == "cuda" else None
    # No buffer changes while training (a quantized base's packed weights, RoPE tables), and DDP would
    # otherwise broadcast every buffer from rank 0 at each forward: a GPTQ base's whole weights.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if one was started (also the single-process one DeepSpeed needed)."""
    if tdist.is_initialized():
        tdist.destroy_process_group()
