"""One benchmark case in its own process (so peak memory is this case's alone).

Run by `qwen-ft bench`: python -m qwen_ft.bench.worker CASE.json; writes case["result"].
qwen-ft cases go through the training code itself (build_run + loop.train); baseline cases
through transformers' Trainer + peft.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

from qwen_ft.bench.measure import StepClock, device_name, peak_memory


class ClockLogger:
    """The loop's logger interface, stamping the end of every optimizer step."""

    def __init__(self, clock: StepClock):
        self.clock = clock

    def step(self, step: int, metrics: dict) -> None:
        self.clock.tick()

    def eval(self, step: int, loss: float) -> None:
        pass

    def close(self, history: list) -> None:
        pass


def run_qwen_ft(case: dict, dist) -> tuple[StepClock, float]:
    """case["steps"] optimizer steps of the real training loop (nothing is saved), and the share of decoder
    layers that were recomputed (gradient checkpointing), for HFU."""
    from qwen_ft.model.load import decoder_layers
    from qwen_ft.recipe import steps
    from qwen_ft.recipe.run import build_run
    from qwen_ft.train import loop

    trainer, state = build_run(steps.checked_config(case["config"], case["overrides"]), dist)
    layers = decoder_layers(trainer.unwrapped)
    recomputed = sum(
        bool(getattr(layer, "gradient_checkpointing", False) or getattr(layer, "checkpointed_in_graph", False))
        for layer in layers
    ) / max(1, len(layers))
    clock = StepClock(dist.device)
    clock.restart()
    loop.train(trainer, state, ClockLogger(clock))
    return clock, recomputed


def measure(case: dict) -> dict:
    """Run the case; out-of-memory and other failures become the result's error."""
    from qwen_ft.bench.baseline import run_baseline
    from qwen_ft.recipe import steps

    dist = steps.distributed()
    try:
        if case["impl"] == "qwen-ft":
            clock, recomputed = run_qwen_ft(case, dist)
        else:  # Trainer checkpoints every layer when asked to
            clock, recomputed = run_baseline(case, dist.device), float(bool(case["gradient_checkpointing"]))
    except torch.OutOfMemoryError:
        return {"error": "out of memory", "device": device_name(dist.device), **peak_memory(dist.device)}
    except Exception as e:  # noqa: BLE001 - reported in the table; the traceback goes to the case log
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:200], "device": device_name(dist.device)}
    return {
        "step_seconds": clock.durations(),
        "recomputed_fraction": recomputed,
        "device": device_name(dist.device),
        **clock.load_peak,
        **peak_memory(dist.device),
    }


def main(argv: list[str]) -> int:
    case = json.loads(Path(argv[0]).read_text())
    Path(case["result"]).write_text(json.dumps(measure(case)))
    return 0


if __name__ == "__main__":
    from qwen_ft.quiet import quiet_third_party

    quiet_third_party()
    sys.exit(main(sys.argv[1:]))
