"""Crash and resume: a run killed with SIGKILL and resumed ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

pytestmark = pytest.mark.serial  # timed, signalled or killed processes: run alone

STEPS = ["train.max_steps=24", "train.save_steps=3", "train.save_total_limit=2", "lora.dropout=0.1"]


def launch(config: str, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "finetune.py"), "--config", config, f"train.output_dir={out}", *STEPS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(run_config, tmp_path):
    config = run_config()
    ref_out, crash_out = tmp_path / "ref", tmp_path / "crash"
    finish(launch(config, ref_out))

    proc = launch(config, crash_out)
    deadline = time.time() + 240
    while not (crash_out / "checkpoints" / "checkpoint-6").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (crash_out / "adapter_model.safetensors").exists(), "killed partway, before the final save"

    log = finish(launch(config, crash_out, "train.resume=auto"))
    resumed_from = int(log.split("resume: from ")[1].split("checkpoint-")[1].split()[0])
    assert 6 <= resumed_from < 24
    ref = load_file(str(ref_out / "adapter_model.safetensors"))
    got = load_file(str(crash_out / "adapter_model.safetensors"))
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_interrupted_save_is_ignored(run_config, tmp_path):
    from qwen_ft.train.resume import resume_path
    from qwen_ft.train.verify import write_manifest

    ckpts = tmp_path / "out" / "checkpoints"
    (ckpts / "checkpoint-3").mkdir(parents=True)
    (ckpts / "checkpoint-3" / "trainer_state.json").write_text("{}")
    write_manifest(ckpts / "checkpoint-3")  # complete and intact
    (ckpts / ".tmp-checkpoint-6").mkdir()  # a save that died: never picked
    (ckpts / "checkpoint-9").mkdir()  # no trainer_state.json: incomplete
    assert resume_path("auto", str(tmp_path / "out")) == ckpts / "checkpoint-3"
