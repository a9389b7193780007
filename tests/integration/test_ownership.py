"""Output directories have an owner, resume continues only the same run, checkpoints are verified, and
non-finite weights are never saved as the last good state (a failed save: test_disk_full.py, real faults)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qwen_ft.errors import QwenFtError
from qwen_ft.recipe import steps
from qwen_ft.recipe.run import run_training
from qwen_ft.train import checkpoint as ck
from qwen_ft.train.distributed import DistInfo
from tests.conftest import REPO

pytestmark = pytest.mark.slow
CPU = DistInfo(0, 1, 0, __import__("torch").device("cpu"))


def train(config: str, *overrides: str):
    return run_training(steps.checked_config(config, list(overrides)), CPU)


def cli_train(config: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen_ft.cli.main", "train", config, *overrides],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


def test_a_new_run_never_writes_over_another(run_config, tmp_path):
    config = run_config(train={"max_steps": 2, "save_steps": 1})
    train(config)
    with pytest.raises(QwenFtError, match=r"holds another run's outputs \(run_config.yaml.*checkpoints/\)"):
        train(config, "train.learning_rate=1e-3")
    _, state = train(config, "train.learning_rate=1e-3", "train.overwrite_output_dir=true")
    saved = (tmp_path / "out" / "run_config.yaml").read_text()
    assert state.step == 2 and "learning_rate: 0.001" in saved
    assert [p.name for p in ck.list_checkpoints(tmp_path / "out" / "checkpoints")] == ["checkpoint-1"]


def test_resume_refuses_a_changed_trajectory_and_allows_more_steps(run_config, tmp_path):
    config = run_config(train={"max_steps": 2, "save_steps": 1, "resume": "auto"})
    train(config)
    with pytest.raises(QwenFtError, match=r"(?s)other settings.*lora.r: 8 -> 4.*train.learning_rate: 0.005 -> 0.001"):
        train(config, "train.learning_rate=1e-3", "lora.r=4")
    _, state = train(config, "train.max_steps=3", "train.logging_steps=2")
    assert state.step == 3


def test_resume_reads_keys_an_older_checkpoint_lacks_as_their_defaults(run_config, tmp_path):
    """A checkpoint written before a key existed resumes when the key is at its default (what ran),
    and is refused when the run now sets another value."""
    import yaml

    from qwen_ft.train.verify import write_manifest

    config = run_config(train={"max_steps": 2, "save_steps": 1, "resume": "auto"})
    train(config)
    saved = tmp_path / "out" / "checkpoints" / "checkpoint-1" / "run_config.yaml"
    old = yaml.safe_load(saved.read_text())
    for key in ("loss_kernel", "adam_beta2", "weight_decay"):
        del old["train"][key]
    saved.write_text(yaml.safe_dump(old))
    write_manifest(saved.parent)  # the edited checkpoint verifies again
    with pytest.raises(QwenFtError, match=r"train.weight_decay: 0.1 -> 0.0"):
        train(config, "train.max_steps=3", "train.weight_decay=0.0")
    _, state = train(config, "train.max_steps=3")
    assert state.step == 3


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(run_config, tmp_path):
    config = run_config(train={"max_steps": 1})
    out = tmp_path / "out"
    out.mkdir()
    import socket

    (out / ".qwen-ft.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    proc = cli_train(config)
    assert proc.returncode == 1 and f"is in use by another run (pid {os.getpid()}" in proc.stderr
    (out / ".qwen-ft.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    proc = cli_train(config)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / ".qwen-ft.lock").exists()


def test_resume_skips_damaged_checkpoints_and_refuses_a_named_one(run_config, tmp_path):
    config = run_config(train={"max_steps": 4, "save_steps": 1, "save_total_limit": 3, "resume": "auto"})
    train(config, "train.max_steps=3")
    root = tmp_path / "out" / "checkpoints"
    newest = ck.list_checkpoints(root)[-1]
    opt = newest / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])  # truncated
    with pytest.raises(QwenFtError, match="optimizer.safetensors is 100 bytes"):
        train(config, f"train.resume={newest}")
    proc = cli_train(config)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resume: skipped {newest}" in proc.stdout + proc.stderr
    assert "checkpoint-1 at step 1" in proc.stdout  # the newest that verifies


@pytest.mark.parametrize("spoil", ["inf_everywhere", "one_nan"])
def test_non_finite_weights_stop_the_run_without_saving_them(run_config, tmp_path, monkeypatch, spoil):
    """An optimizer step that overflows a weight (injected: the second step writes inf into one LoRA
    matrix, or a NaN into one element of one, with a finite loss and gradient) stops the run; the
    spoilt state is never saved."""
    import torch

    from qwen_ft.train.backends import TorchBackend

    real, count = TorchBackend.step, []

    def overflowing(self, grad_norm):
        out = real(self, grad_norm)
        count.append(1)
        if len(count) == 2:
            with torch.no_grad():
                trained = [p for p in self.unwrapped.parameters() if p.requires_grad]
                if spoil == "one_nan":
                    trained[-1].view(-1)[1] = float("nan")
                else:
                    trained[0].fill_(float("inf"))
        return out

    monkeypatch.setattr(TorchBackend, "step", overflowing)
    config = run_config(train={"max_steps": 4, "save_steps": 1})
    with pytest.raises(QwenFtError, match=r"non-finite weights after step 2 \(learning rate .*checkpoint-1"):
        train(config)
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["checkpoint-1"]


def test_resume_after_the_data_changed_is_refused_naming_it_unless_told_to_restart(run_config, tmp_path, capsys):
    import shutil

    data = tmp_path / "data.jsonl"
    shutil.copyfile(REPO / "data/example_chatml.jsonl", data)
    config = run_config(data={"train_files": [str(data)]}, train={"max_steps": 2, "save_steps": 1, "resume": "auto"})
    train(config)
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[1:] + lines[:1]))  # the same rows in another order: other examples at each position
    refused = rf"(?s)trained on other data.*data file {data} changed since then.*resume_data: restart"
    with pytest.raises(QwenFtError, match=refused):
        train(config, "train.max_steps=3")
    capsys.readouterr()
    _, state = train(config, "train.max_steps=3", "train.resume_data=restart")
    out = capsys.readouterr().out
    assert state.step == 3 and "the data starts over at step 1 (data file" in out, out

    other = tmp_path / "other.jsonl"
    other.write_text("".join(lines[:40]))
    with pytest.raises(QwenFtError, match=r"data.train_files"):  # another file: a changed setting
        train(config, "train.max_steps=4", f"data.train_files=[{other}]")
    _, state = train(config, "train.max_steps=4", f"data.train_files=[{other}]", "train.resume_data=restart")
    assert state.step == 4
