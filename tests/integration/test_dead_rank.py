"""A dead or hung rank (issue 31, point 6), for real: in a two-process gloo run one process is killed
(SIGKILL) or frozen (SIGSTOP); the other stops within a bounded time, naming the rank and the checkpoint
to resume from, without a traceback. Under torchrun --max-restarts the job restarts by itself and resumes
from its last checkpoint, ending as the uninterrupted run does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.integration.test_preemption import finish, same_run

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # timed, signalled or killed processes: run alone
STEPS = ["train.max_steps=12", "train.save_steps=4", "train.save_total_limit=3"]  # killed after checkpoint-4


def launch(config: str, out: Path, *extra: str, procs: int = 2) -> subprocess.Popen:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port"]
    cmd = [*torchrun, str(free_port()), str(REPO / "finetune.py"), "--config", config, f"train.output_dir={out}"]
    return subprocess.Popen(
        [*cmd, *STEPS, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )


def launch_pair(config: str, out: Path, *extra: str) -> list[subprocess.Popen]:
    """Two processes of one job started as a launcher would start them, without torchrun's agent (which
    would stop the survivor itself): rank 0 holds the rendezvous store."""
    port, procs = free_port(), []
    cmd = [sys.executable, str(REPO / "finetune.py"), "--config", config, f"train.output_dir={out}", *STEPS, *extra]
    for rank in (0, 1):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank)}
        env |= {"LOCAL_RANK": str(rank)}
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **env}
            )
        )
    return procs


def after_first_checkpoint(out: Path, *procs: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while not (out / "checkpoints" / "checkpoint-4").is_dir():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "the run ended before the fault"
        time.sleep(0.01)


def stopped_naming_rank_1(survivor: subprocess.Popen, out: Path) -> tuple[str, float]:
    """The survivor's stderr and how long it took to stop; it exited 1 naming rank 1 and a checkpoint."""
    start = time.time()
    _, err = survivor.communicate(timeout=180)
    took = time.time() - start
    assert survivor.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "error: rank 0: rank 1 of 2 stopped answering" in err, err[-3000:]
    assert f"The last checkpoint is {out / 'checkpoints'}" in err and "train.resume=auto" in err, err[-3000:]
    return err, took


def test_a_killed_rank_is_named_by_the_survivor_within_seconds(run_config, tmp_path):
    out = tmp_path / "out"
    rank0, rank1 = launch_pair(run_config(), out, "train.collective_timeout=3")
    after_first_checkpoint(out, rank0, rank1)
    rank1.kill()  # SIGKILL: its sockets close, the survivor's next collective fails at once
    rank1.communicate()
    _, took = stopped_naming_rank_1(rank0, out)
    assert took < 40  # the collective fails at once; the others are given 3 s (the timeout) to answer


def test_a_hung_rank_is_named_once_the_collective_timeout_passes(run_config, tmp_path):
    out = tmp_path / "out"
    rank0, rank1 = launch_pair(run_config(), out, "train.collective_timeout=3")
    try:
        after_first_checkpoint(out, rank0, rank1)
        os.kill(rank1.pid, signal.SIGSTOP)  # frozen: its connections stay open, it never answers
        err, took = stopped_naming_rank_1(rank0, out)
        assert "train.collective_timeout=3 s" in err
        assert 3 <= took < 40, took  # the 3 s timeout, then as long again for the others' answers
    finally:
        rank1.kill()
        rank1.communicate()


def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(run_config, tmp_path):
    import psutil

    config = run_config()
    reference = tmp_path / "reference"
    finish(launch(config, reference))
    out = tmp_path / "restarted"
    env = {**os.environ, "NPROC": "2", "MAX_RESTARTS": "1"}  # the launcher users run, as they run it
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # its torchrun: this Python's
    cmd = ["bash", str(REPO / "scripts" / "train_multi_gpu.sh"), config, f"train.output_dir={out}", *STEPS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    deadline, workers = time.time() + 120, []
    while len(workers) < 2:  # torchrun's two worker processes, found by their RANK
        assert proc.poll() is None and time.time() < deadline, "torchrun ended early"
        workers = [p for p in psutil.Process(proc.pid).children() if "RANK" in p.environ()]
        time.sleep(0.05)
    after_first_checkpoint(out, proc)
    next(p for p in workers if p.environ()["RANK"] == "1").kill()
    stdout = finish(proc)
    assert f"resume: from {out / 'checkpoints'}" in stdout, stdout[-3000:]  # after the restart
    same_run(out, reference)


WAITS = """
import sys, time
from qwen_ft.train.distributed import all_reduce_sum, init_distributed, local_main_first
d = init_distributed(timeout_s=2)
with local_main_first(d):  # local rank 0 builds a cache (here: sleeps) past the 2 s timeout; the others wait
    if d.local_rank == 0:
        time.sleep(5)
print("after the barrier", all_reduce_sum([1.0], d), flush=True)
if d.rank == 0:
    time.sleep(5)  # a collective, unlike a barrier, gives up after train.collective_timeout
try:
    all_reduce_sum([1.0], d)
except RuntimeError as e:
    print("collective timed out:", str(e).splitlines()[0][:120], flush=True)
"""


def test_barriers_wait_past_the_collective_timeout_and_collectives_do_not(tmp_path):
    """The main process's long work behind a barrier (building the data cache, converting a checkpoint, writing
    a checkpoint) must not trip train.collective_timeout, which bounds the collectives of a training step."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank)}
        env |= {"LOCAL_RANK": str(rank)}
        cmd = [sys.executable, "-c", WAITS]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **env}))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all("after the barrier [2.0]" in out for out in outs), outs
    assert "collective timed out" in outs[1], outs  # rank 1 waited for rank 0 in the all-reduce, and gave up
