"""The CLI on the bundled demo data: preprocess, inspect, finetune.py entry, validate."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from qwen_ft.cli.main import main
from tests.conftest import REPO


@pytest.fixture(scope="module")
def demo_args(tmp_path_factory, qwen3_dir):
    cache = tmp_path_factory.mktemp("cache")
    return [f"tokenizer.path={qwen3_dir}", f"model.path={qwen3_dir}", f"data.cache_dir={cache}"]


def test_preprocess_demo_config(demo_args, capsys):
    cfg = str(REPO / "configs/tiny_cpu_smoke.yaml")
    assert main(["preprocess", "--config", cfg, *demo_args]) == 0
    out = capsys.readouterr().out
    assert "cache built" in out
    assert re.search(r"conversations read\s+84\n", out) and re.search(r"examples\s+84\n", out)
    assert re.search(r"packed rows\s+\d+\n", out) and re.search(r"padding efficiency\s+\d+\.\d%", out)
    assert main(["preprocess", "--config", cfg, *demo_args]) == 0
    assert "cache hit" in capsys.readouterr().out


def test_preprocess_qwen_format_with_v1_tokenizer(tmp_path, v1_dir, capsys):
    rc = main(
        [
            "preprocess",
            "--tokenizer",
            str(v1_dir),
            "--data",
            str(REPO / "data/example_qwen.json"),
            "--label-policy",
            "qwen_reference",
            f"data.cache_dir={tmp_path}",
        ]
    )
    assert rc == 0 and re.search(r"examples\s+10\n", capsys.readouterr().out)


def test_inspect_marks_learned_tokens(demo_args, capsys):
    cfg = str(REPO / "configs/tiny_cpu_smoke.yaml")
    assert main(["inspect", "--config", cfg, "--index", "0", "--no-color", *demo_args]) == 0
    out = capsys.readouterr().out
    # Qwen3's template (the demo model's): the final reply renders, and is learned, with its empty thinking
    assert "[[New Delhi.<|im_end|>]]" in out and "[[<think>\n\n</think>\n\nTokyo.<|im_end|>]]" in out
    assert "<|im_start|>user\nCapital of India?<|im_end|>" in out
    assert main(["inspect", "--config", cfg, "--index", "999", *demo_args]) == 1
    assert "only 84 valid conversation(s)" in capsys.readouterr().err


def test_qwen_ft_train_subcommand(run_config, capsys):
    # `qwen-ft train` runs the same path as finetune.py (exercised by the resume and torchrun tests).
    assert main(["train", run_config(), "train.max_steps=2"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out


def test_finetune_entry_config_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "finetune.py"),
            "--config",
            str(REPO / "configs/tiny_cpu_smoke.yaml"),
            "data.max_lenght=9",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 1 and "did you mean 'data.max_length'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_make_tiny_model_loads_with_stock_transformers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from qwen_ft.tokenizer import load_tokenizer

    out = tmp_path / "tiny"
    assert main(["make-tiny-model", str(out), "--hidden", "32", "--layers", "1"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "qwen3" and model.config.vocab_size == 151936
    assert (out / "model.safetensors").is_file() and load_tokenizer(out).im_end_id == 151645
