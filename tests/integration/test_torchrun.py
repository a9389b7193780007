"""`torchrun --nproc_per_node 2 finetune.py` runs the same code path with DDP over gloo on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.serial  # timed, signalled or killed processes: run alone


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_train_and_save(run_config, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "finetune.py"),
        "--config",
        run_config(),
        f"train.output_dir={out}",
        "train.max_steps=4",
        "data.eval_fraction=0.1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout and proc.stdout.count("done: 4 steps") == 1  # printed by rank 0 only
    history = json.loads((out / "train_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert [h["step"] for h in history if "eval_loss" in h] == [4]
    assert (out / "adapter_model.safetensors").is_file()
