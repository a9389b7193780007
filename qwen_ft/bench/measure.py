"""Peak memory and per-step wall time, measured the same way for qwen-ft and the baseline."""

from __future__ import annotations

import resource
import sys
import time

import torch

GB = 1024**3


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timestamp means the step has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak since the process started: allocated and reserved by PyTorch on a GPU; resident set on a CPU."""
    if device.type == "cuda":
        return {
            "peak_gb": torch.cuda.max_memory_allocated(device) / GB,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / GB,
        }
    return {"peak_gb": peak_rss_bytes() / GB}


def peak_rss_bytes() -> int:
    """This process's peak resident set. Linux: VmHWM, which starts afresh at exec; ru_maxrss would
    carry over the RSS of the process that forked this worker (the benchmark's parent)."""
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        if hwm > 0:
            return hwm
    except (OSError, StopIteration, ValueError, IndexError):  # no /proc (macOS), or a kernel without the line
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024)


def device_name(device: torch.device) -> str:
    """The accelerator's marketing name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class StepClock:
    """Timestamps at the end of each optimizer step; step k lasts from the end of step k-1."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks = [time.perf_counter()]
        self.load_peak: dict[str, float] = {}

    def restart(self) -> None:
        """Start counting from now (just before the first step). The peak so far (loading the model)
        is kept apart and, on a GPU, the peak counter restarts, so the training peak is its own."""
        synchronize(self.device)
        self.load_peak = {f"load_{k}": v for k, v in peak_memory(self.device).items()}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.marks = [time.perf_counter()]

    def tick(self) -> None:
        """An optimizer step has been queued: wait for it and stamp the time."""
        synchronize(self.device)
        self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
