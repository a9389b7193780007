"""Which processes of a job are gone when a collective fails, so that a dead or hung rank never leaves the
others waiting forever and the error names it.

A collective waits at most train.collective_timeout (`distributed.init_distributed`) and fails at once
when a peer's connection drops (gloo) or its watchdog fires (NCCL). Every process that sees one fail then
says so in the job's rendezvous store and waits a few seconds for the others to say the same; the ranks
that never do are the ones that died or hang. The store is torchrun's agent's (which outlives its workers)
or, with the launchers' fresh store per restart or without torchrun, rank 0's: when rank 0 is the one
gone, that is what is said. Barriers wait longer (`distributed.WAIT_TIMEOUT`): behind them one process
builds the data cache or writes a checkpoint.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from qwen_ft.errors import RankLost
from qwen_ft.train.distributed import DistInfo

ANSWER_S = 10.0  # how long survivors wait for each other's answer (at most train.collective_timeout)
# gloo raises a plain RuntimeError whose message names its source file ("gloo/transport/tcp/pair.cc: Read error
# ... Connection reset by peer", "... Timed out waiting 5000ms for recv"); NCCL and the stores raise DistError.
COLLECTIVE_MARKS = ("gloo/", "nccl", "processgroup", "connection reset by peer", "connection closed by peer")


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective (or the process group under it) failing, not a problem of this process."""
    import torch.distributed as tdist

    return isinstance(error, tdist.DistError) or any(m in str(error).lower() for m in COLLECTIVE_MARKS)


def silent_ranks(rank: int, world: int, wait_s: float = ANSWER_S) -> list[int] | None:
    """The ranks that do not say within `wait_s` that they are alive (empty: all did); None when the
    rendezvous store cannot be reached."""
    import torch.distributed as tdist

    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = tdist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=wait_s))
        prefix = f"qwen_ft/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        store.set(f"{prefix}/{rank}", "1")
        missing, deadline = list(range(world)), time.monotonic() + wait_s
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"{prefix}/{r}"])]
            time.sleep(0.1)
        return missing
    except (KeyError, ValueError, RuntimeError):  # no store address, or the store is gone (DistStoreError)
        return None


def lost_rank_error(
    error: BaseException, dist: DistInfo, output_dir: str, timeout_s: int, wait_s: float = ANSWER_S
) -> RankLost | None:
    """The error to stop with when `error` is a failed collective of a multi-process run and another rank is
    gone; None otherwise (one process, another error, or every rank answers), so `error` stands as it is."""
    if dist.world == 1 or not is_collective_failure(error):
        return None
    rank, world = dist.rank, dist.world
    silent = silent_ranks(rank, world, min(wait_s, timeout_s))  # survivors fail together, within the timeout
    if silent == []:
        return None
    who = (
        f"rank {', '.join(map(str, silent))} of {world} stopped answering (killed, crashed or hung)"
        if silent
        else "the job's rendezvous store is unreachable: rank 0, which holds it, is gone"
    )
    cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return RankLost(
        f"rank {rank}: {who}; a collective failed: {cause}. Collectives wait at most "
        f"train.collective_timeout={timeout_s} s. {_resume_hint(output_dir)}"
    )


def _resume_hint(output_dir: str) -> str:
    """Where the run can go on from: the newest complete checkpoint and how to resume it."""
    from qwen_ft.train.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(Path(output_dir) / "checkpoints")
    if not checkpoints:
        return "No checkpoint was saved yet: rerun the job (set train.save_steps to checkpoint during the run)."
    return (
        f"The last checkpoint is {checkpoints[-1]}: rerun with train.resume=auto, or launch with torchrun "
        "--max-restarts=N so that a failed job restarts and resumes from it by itself."
    )
