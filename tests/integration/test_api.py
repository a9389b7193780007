"""The library API: a fine-tuning, merge, estimate and chat from Python, without qwen_ft.cli."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = """
import json, sys
import qwen_ft
from qwen_ft.config.schema import RunConfig

cfg = qwen_ft.load_config(sys.argv[1], ["train.max_steps=3"])
assert isinstance(cfg, RunConfig)
r = qwen_ft.finetune(cfg, ["train.logging_steps=2"])
merged = qwen_ft.merge(r.model_path, sys.argv[2])
e = qwen_ft.estimate(sys.argv[1])
answer = qwen_ft.chat(sys.argv[2], "Capital of Peru?", max_new_tokens=4)
print(json.dumps({"steps": r.steps, "first": r.first_loss, "last": r.last_loss, "out": str(r.output_dir),
                  "model": str(r.model_path), "merged": str(merged.out_dir), "estimate": e.estimate.total,
                  "answer": answer, "cli": sorted(m for m in sys.modules if m.startswith("qwen_ft.cli"))}))
"""


@pytest.mark.slow
def test_finetune_merge_estimate_chat_from_python_without_the_cli(run_config, tmp_path):
    config = run_config()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, config, str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cli"] == []
    assert got["steps"] == 3 and got["last"] < got["first"]
    history = json.loads((tmp_path / "out" / "train_history.json").read_text())
    assert [h["loss"] for h in history if "loss" in h][::2] == [got["first"], got["last"]]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and got["model"] == got["out"]
    assert (tmp_path / "merged" / "model.safetensors").is_file() and got["estimate"] > 0
    assert isinstance(got["answer"], str)


def test_importing_qwen_ft_loads_nothing_heavy():
    code = (
        "import sys, qwen_ft; qwen_ft.finetune; print(sorted(m for m in ('torch', 'transformers', 'peft') "
        "if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_unknown_api_name_is_an_attribute_error():
    import qwen_ft

    with pytest.raises(AttributeError, match="no attribute 'fine_tune'"):
        qwen_ft.fine_tune  # noqa: B018 - the lookup itself is what is tested
