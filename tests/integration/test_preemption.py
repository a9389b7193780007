"""Preemption with real signals: SIGTERM, SIGUSR1 (SLURM's --signal) and SIGINT stop a run after its
current optimizer step with a checkpoint of that step and exit 75; the resumed run ends exactly as an
uninterrupted one. A second signal exits at once and leaves the last complete checkpoint intact.
Under torchrun, a signal to one process stops both after the same step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # timed, signalled or killed processes: run alone
STEPS = ["train.max_steps=30", "train.save_steps=4", "train.save_total_limit=3"]
PREEMPTED = 75


def launch(config: str, out: Path, *extra: str, procs: int = 1, session: bool = False) -> subprocess.Popen:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
    head = [*torchrun, "--master_port", str(free_port())] if procs > 1 else [sys.executable]
    cmd = [*head, str(REPO / "finetune.py"), "--config", config, f"train.output_dir={out}", *STEPS, *extra]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=session
    )


def signal_after_first_checkpoint(proc: subprocess.Popen, out: Path, *signals: int, pid: int | None = None) -> None:
    """Once checkpoint-4 exists (the run is mid-training), send `signals` to `pid` (default: the run)."""
    deadline = time.time() + 240
    while not (out / "checkpoints" / "checkpoint-4").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
        time.sleep(0.01)
    for s in signals:
        os.kill(pid or proc.pid, s)
        time.sleep(0.005)


def stopped_at(proc: subprocess.Popen, out: Path, name: str) -> int:
    """The step a preempted run stopped after: it exited 75 naming the signal, the checkpoint of that very
    step and the resume command, printed no traceback, and left that checkpoint complete."""
    from qwen_ft.train.resume import resume_path

    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED, err[-3000:]
    assert "Traceback" not in err and f"{name}: stopping after this optimizer step" in err, err[-3000:]
    line = err[err.index("stopped: ") :]
    step = int(line.split(" after step ")[1].split()[0])
    assert f"saved {out / 'checkpoints' / f'checkpoint-{step}'}" in line and "train.resume=auto" in line, line
    assert 4 <= step < 30 and resume_path("auto", str(out)).name == f"checkpoint-{step}"
    assert not (out / "adapter_model.safetensors").exists()
    return step


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def same_run(a: Path, b: Path) -> None:
    """Equal adapters, bit for bit, and equal losses at every step."""
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    history = [json.loads((d / "train_history.json").read_text()) for d in (a, b)]
    assert [(h["step"], h["loss"]) for h in history[0] if "loss" in h] == [
        (h["step"], h["loss"]) for h in history[1] if "loss" in h
    ]


def test_sigterm_saves_this_step_and_the_resumed_run_equals_the_uninterrupted_one(run_config, tmp_path):
    config = run_config()
    finish(launch(config, tmp_path / "ref"))
    out = tmp_path / "run"
    proc = launch(config, out)
    signal_after_first_checkpoint(proc, out, signal.SIGTERM)
    step = stopped_at(proc, out, "SIGTERM")
    log = finish(launch(config, out, "train.resume=auto"))
    assert f"checkpoint-{step} at step {step}" in log
    same_run(tmp_path / "ref", out)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_slurm_signal_and_ctrl_c_stop_the_same_way(run_config, tmp_path, sig):
    out = tmp_path / "run"
    proc = launch(run_config(), out)
    signal_after_first_checkpoint(proc, out, sig)
    stopped_at(proc, out, signal.Signals(sig).name)


def test_a_second_signal_exits_at_once_and_the_last_checkpoint_stays_intact(run_config, tmp_path):
    """The second signal is sent once the first is acknowledged (two sent together reach Python's handler
    as one), while the run is finishing its step and saving."""
    import threading

    from qwen_ft.train.resume import resume_path

    out = tmp_path / "run"
    proc = launch(run_config(), out)
    err: list[str] = []

    def read() -> None:  # stderr line by line; the second SIGTERM as soon as the first is acknowledged
        for line in proc.stderr:
            err.append(line)
            if "stopping after this optimizer step" in line:
                os.kill(proc.pid, signal.SIGTERM)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    signal_after_first_checkpoint(proc, out, signal.SIGTERM)
    proc.wait(timeout=300)
    reader.join(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(err)[-3000:]
    newest = resume_path("auto", str(out))  # verifies sizes and hashes
    assert newest is not None and newest.name.startswith("checkpoint-")
    (out / "checkpoints" / f".tmp-checkpoint-{newest.name.split('-')[1]}9").mkdir()  # as a save cut short leaves
    assert finish(launch(run_config(), out, "train.resume=auto"))
    assert not list(out.rglob(".tmp-checkpoint-*")) and not list(out.glob(".final.tmp-*"))  # the resume removed them


@pytest.mark.timeout(600)
def test_under_torchrun_a_signal_to_one_process_stops_both_after_the_same_step(run_config, tmp_path):
    import psutil

    config = run_config()
    out = tmp_path / "ddp"
    proc = launch(config, out, procs=2)
    deadline = time.time() + 120
    workers: list = []
    while len(workers) < 2:  # torchrun's two worker processes, found by their RANK
        assert proc.poll() is None and time.time() < deadline, "torchrun ended early"
        workers = [p for p in psutil.Process(proc.pid).children() if "RANK" in p.environ()]
        time.sleep(0.05)
    rank1 = next(p for p in workers if p.environ()["RANK"] == "1")
    signal_after_first_checkpoint(proc, out, signal.SIGTERM, pid=rank1.pid)  # rank 1 only
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err[-3000:]  # torchrun reports its workers' exit 75 as a failure
    assert "SIGTERM: stopping after this optimizer step" in err
    step = int(err.split("stopped: SIGTERM after step ")[1].split()[0])  # rank 0 reports the other's signal
    assert f"checkpoint-{step}" in [p.name for p in (out / "checkpoints").iterdir()]
    resumed = launch(config, out, "train.resume=auto", procs=2)
    assert f"checkpoint-{step} at step {step}" in finish(resumed)
    assert (out / "adapter_model.safetensors").is_file()


def test_slurm_signalling_torchrun_and_its_workers_together_stops_them_with_a_checkpoint(run_config, tmp_path):
    """SLURM signals every process of the job step: torchrun forwards its copy to workers that already have
    SLURM's, a moment apart. That is one request, not a second signal: the workers still finish the step
    and save it."""
    from qwen_ft.train.resume import resume_path

    out = tmp_path / "ddp"
    proc = launch(run_config(), out, procs=2, session=True)  # its own process group, as a job step's
    deadline = time.time() + 240
    while not (out / "checkpoints" / "checkpoint-4").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun and both workers
    _, err = proc.communicate(timeout=300)
    assert (
        "stopped: SIGTERM after step " in err and "Traceback (most recent call last)" not in err.split("stopped:")[0]
    )
    step = int(err.split("stopped: SIGTERM after step ")[1].split()[0])
    assert resume_path("auto", str(out)).name == f"checkpoint-{step}" and step >= 4
