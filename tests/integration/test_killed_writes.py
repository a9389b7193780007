"""`kill -9` in the middle of writing a merged model: what is left at --out is nothing, or the complete
model that was there before, never a half-written one that loads; the rerun works and removes what the
killed process left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # timed, signalled or killed processes: run alone


def merge(adapter: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwen_ft.cli.main", "merge", str(adapter), "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def kill_while_writing(proc: subprocess.Popen, out: Path) -> Path:
    """SIGKILL the merge as soon as its temporary output directory has a file in it; returns that directory."""
    deadline = time.time() + 240
    while True:
        temps = [p for p in out.parent.glob(f".{out.name}.tmp-*") if any(p.iterdir())]
        if temps:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return temps[0]
        assert proc.poll() is None and time.time() < deadline, "the merge ended before it could be killed"
        time.sleep(0.0005)


def finished(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_merge_killed_midway_leaves_nothing_or_the_previous_model(run_config, tmp_path):
    from qwen_ft.cli.main import main

    assert main(["train", run_config(train={"max_steps": 1})]) == 0
    adapter, out = tmp_path / "out", tmp_path / "merged"

    left = kill_while_writing(merge(adapter, out), out)
    assert not out.exists()  # nothing that could be loaded as the merged model
    finished(merge(adapter, out))
    assert not left.exists() and (out / "model.safetensors").is_file()  # the rerun removed the leftover

    before = files(out)
    kill_while_writing(merge(adapter, out, "--overwrite"), out)
    assert files(out) == before  # the previous complete model, byte for byte


@pytest.mark.extras("gptqmodel")
def test_quantize_killed_midway_leaves_nothing_and_the_rerun_works(tmp_path):
    from qwen_ft.model.tiny import make_tiny_model

    dense, out = make_tiny_model(tmp_path / "dense", hidden=64, layers=1), tmp_path / "gptq"
    calibration = ["--group-size", "32", "--samples", "16", "--calibration", str(REPO / "data/example_chatml.jsonl")]
    cmd = [sys.executable, "-m", "qwen_ft.cli.main", "quantize", str(dense), "--out", str(out), *calibration]

    def quantize() -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)

    left = kill_while_writing(quantize(), out)  # its first file: gptqmodel's log, written while it quantizes
    assert not out.exists()
    finished(quantize())
    assert not left.exists() and (out / "model.safetensors").is_file() and (out / "quantize_config.json").is_file()
