"""What a user sees: qwen-ft's own lines and progress bar only, with the extras installed; every
option documented with its default."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Lines qwen-ft itself prints during `train` (data stats, model, plan, progress bar, summary).
OWN = re.compile(r"^(data |  \S|model: |plan: |note: |resume: |training: |done: |$)")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen_ft.cli.main", *args], capture_output=True, text=True, cwd=REPO, timeout=600
    )


def foreign_lines(text: str) -> list[str]:
    """Lines (tqdm redraws split on carriage returns) that qwen-ft did not print."""
    return [line for line in re.split(r"[\r\n]", text) if not OWN.match(line)]


@pytest.mark.slow
@pytest.mark.extras("gptqmodel", "bitsandbytes")  # the noise comes from the optional stacks
def test_train_and_chat_print_only_qwen_ft_lines(run_config, tmp_path):
    config = run_config(train={"max_steps": 2, "output_dir": str(tmp_path / "out")})
    train = cli("train", config)
    assert train.returncode == 0, train.stderr[-3000:]
    assert foreign_lines(train.stdout + train.stderr) == []
    assert "done: 2 steps" in train.stdout
    chat = cli("chat", str(tmp_path / "out"), "--prompt", "hi", "--max-new-tokens", "3")
    assert chat.returncode == 0, chat.stderr[-3000:]
    import qwen_ft

    assert chat.stderr == "" and chat.stdout == qwen_ft.chat(tmp_path / "out", "hi", max_new_tokens=3) + "\n"
    verbose = cli("train", config, f"train.output_dir={tmp_path / 'out2'}", "--verbose")
    assert verbose.returncode == 0 and foreign_lines(verbose.stdout + verbose.stderr) != []


def test_every_option_has_help_and_shows_its_default():
    from qwen_ft.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            assert action.help, f"qwen-ft {name} {action.option_strings or action.dest} has no help"
        text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_help_does_not_leak_docstrings_meant_for_developers():
    text = cli("train", "--help").stdout
    assert "usage: qwen-ft train" in text and "below" not in text


def test_estimate_without_a_checkpoint_names_the_fix(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{path: {tmp_path / 'nowhere'}}}\ndata: {{train_files: [x.jsonl]}}\n")
    proc = cli("estimate", str(cfg))
    assert proc.returncode == 1
    assert "model.path=DIR" in proc.stderr and "config.json" in proc.stderr


def test_main_called_in_process_hides_nothing(tmp_path):
    """Hiding unused stacks is for a process the command owns; a caller of main([...]) keeps them."""
    import sys

    from qwen_ft.cli.main import main

    assert main(["make-tiny-model", str(tmp_path / "m"), "--hidden", "16", "--layers", "1"]) == 0
    assert all(sys.modules.get(name, "absent") is not None for name in ("bitsandbytes", "gptqmodel", "torchao"))
