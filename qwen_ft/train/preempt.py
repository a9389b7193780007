"""Preemption: SIGTERM (SLURM, Kubernetes, spot instances), SIGUSR1 (what SLURM's --signal sends) and
SIGINT (Ctrl-C) ask the run to stop after its current optimizer step, with a checkpoint to resume from.

A second signal exits at once: checkpoints are written into a temporary directory and renamed when
complete, so the last complete one stays as it was. Under torchrun a second one within DUPLICATE_S of the
first is the same request: SLURM signals every process of a job step, and torchrun forwards its own copy
to its workers a moment later. Under torchrun every process takes part in the
decision after each step, so all stop after the same one whichever of them was signalled.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from qwen_ft.train.distributed import DistInfo, all_reduce_sum

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
DUPLICATE_S = 5.0


class StopRequests:
    """While entered (in the main thread), the stop signals set `signum` instead of ending the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._at = 0.0
        self._copies_expected = "TORCHELASTIC_RUN_ID" in os.environ  # a worker of torchrun

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            if self._copies_expected and time.monotonic() - self._at < DUPLICATE_S:
                return  # the launcher's copy of the same signal
            os._exit(128 + signum)  # as if killed by it, which a caller can tell from a planned stop
        self.signum, self._at = signum, time.monotonic()
        name = signal.Signals(signum).name
        print(f"\n{name}: stopping after this optimizer step (send it again to stop at once)", file=sys.stderr)

    def agreed(self, dist: DistInfo) -> str | None:
        """The name of the signal that stops the run after this step, when any process got one (a
        collective under torchrun: every process calls it after every step)."""
        got = all_reduce_sum([1.0 if self.signum else 0.0, float(self.signum or 0)], dist)
        if not got[0]:
            return None
        signum = self.signum or round(got[1] / got[0])  # another process's signal
        return signal.Signals(signum).name if signum in set(STOP_SIGNALS) else "a stop signal"


def resume_command(world: int) -> str:
    """The command line that started this process, with train.resume=auto added."""
    import shlex

    argv = [Path(sys.argv[0]).name if not sys.argv[0].endswith(".py") else sys.argv[0], *sys.argv[1:]]
    launcher = "torchrun [the same options] " if world > 1 else ("python " if argv[0].endswith(".py") else "")
    return launcher + shlex.join([a for a in argv if not a.startswith("train.resume=")]) + " train.resume=auto"
