"""A LoRA run on a plain base never imports gptqmodel (its banner, its PYTORCH_ALLOC_CONF rewrite),
even where gptqmodel is installed; peft would import it to ask about every layer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.extras("gptqmodel")  # only meaningful where gptqmodel is installed

PROBE = """
import sys, torch
from qwen_ft.recipe.run import build_run
from qwen_ft.recipe.steps import checked_config
from qwen_ft.train.distributed import DistInfo
build_run(checked_config(sys.argv[1], []), DistInfo(0, 1, 0, torch.device("cpu")))
print("gptqmodel imported:", "gptqmodel" in sys.modules)
"""


def test_lora_on_a_plain_base_does_not_import_gptqmodel(run_config):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, run_config()], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gptqmodel imported: False" in proc.stdout and "GPT-QModel" not in proc.stdout + proc.stderr
