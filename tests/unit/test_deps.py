"""Optional dependencies: nothing heavy at import, one probe, install hints."""

from __future__ import annotations

import subprocess
import sys

import pytest

import qwen_ft.deps as deps
from qwen_ft.errors import MissingDependency

HEAVY = ("deepspeed", "bitsandbytes", "gptqmodel", "flash_attn", "torch", "transformers", "datasets")


def test_import_and_help_load_nothing_heavy():
    code = (
        "import sys, qwen_ft, qwen_ft.cli.main as m; p = m.build_parser(); "
        f"print(sorted(set({HEAVY!r}) & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "qwen_ft.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "preprocess" in out.stdout and "validate" in out.stdout


def test_missing_extra_names_pip_command(monkeypatch):
    monkeypatch.setattr(deps, "find_spec", lambda name: None)
    with pytest.raises(MissingDependency, match=r"pip install 'qwen-ft\[deepspeed\]'"):
        deps.require("deepspeed", "dist.deepspeed=zero2")
    assert not deps.is_available("gptq")
    assert "gptqmodel, optimum not installed" in deps.missing_message("gptq", "x")


def test_present_extra_passes(monkeypatch):
    monkeypatch.setattr(deps, "find_spec", lambda name: object())
    deps.require("flash_attn", "x")
