"""Faults and misuse end in one clear `error:` line (or are skipped and counted), never a traceback:
empty and all-bad data, broken text, configs that name what the checkpoint lacks, pickle weights,
remote code, merges over the inputs, chat on directories that hold no model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import conv, write_jsonl

GOOD = conv("hi", "hello")


def cli(*args: str) -> subprocess.CompletedProcess:
    """`qwen-ft ARGS` in this process (a subprocess would spend seconds importing torch each time), with
    its exit status and output; an exception that escapes the CLI's error handling fails the test."""
    import contextlib
    import io

    from qwen_ft.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def one_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit 1 with an `error:` line holding `message`, and no traceback."""
    assert proc.returncode == 1, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.lstrip().startswith("error:")


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "  \n\n"), ("list.json", "[]")])
def test_empty_data_files_say_there_is_nothing_to_train_on(tmp_path, qwen3_dir, name, text):
    (tmp_path / name).write_text(text)
    proc = cli(
        "preprocess", "--tokenizer", str(qwen3_dir), "--data", str(tmp_path / name), f"data.cache_dir={tmp_path / 'c'}"
    )
    one_error(proc, f"no training conversations in {tmp_path / name}: the file(s) hold no rows")


def test_all_rows_skipped_lists_why_with_and_n_more(tmp_path, qwen3_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}] * 8)
    proc = cli(
        "preprocess",
        "--tokenizer",
        str(qwen3_dir),
        "--data",
        str(path),
        "--on-error",
        "skip",
        f"data.cache_dir={tmp_path / 'c'}",
    )
    one_error(proc, "all 8 row(s) were skipped as bad")
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [GOOD] + [{"messages": [{"role": "bot", "content": "x"}]}] * 8)
    ok = cli(
        "preprocess",
        "--tokenizer",
        str(qwen3_dir),
        "--data",
        str(mixed),
        "--on-error",
        "skip",
        f"data.cache_dir={tmp_path / 'c'}",
    )
    assert ok.returncode == 0 and "skipped: ... and 3 more" in ok.stdout


def test_lone_surrogate_is_a_row_error_and_bom_costs_no_row(tmp_path, qwen3_dir):
    path = tmp_path / "d.jsonl"
    broken = b'{"messages": [{"role": "user", "content": "x \\ud800"}, {"role": "assistant", "content": "y"}]}\n'
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n" + broken)
    strict = cli("preprocess", "--tokenizer", str(qwen3_dir), "--data", str(path), f"data.cache_dir={tmp_path / 'c'}")
    one_error(strict, f"{path}:2: text holds a lone surrogate U+D800")
    skip = cli(
        "preprocess",
        "--tokenizer",
        str(qwen3_dir),
        "--data",
        str(path),
        "--on-error",
        "skip",
        f"data.cache_dir={tmp_path / 'c'}",
    )
    assert skip.returncode == 0
    assert "conversations read       2" in skip.stdout and "examples                 1" in skip.stdout


def test_validate_names_what_the_checkpoint_lacks(run_config, tiny_model_dir, tmp_path):
    config = run_config()
    one_error(
        cli("validate", config, "lora.target_modules=[q_prj,v_proj]"),
        "lora.target_modules: 'q_prj' names no module of",
    )
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    one_error(
        cli("validate", config, f"train.output_dir={blocked / 'out'}"),
        f"train.output_dir: '{blocked / 'out'}' cannot be written by this user",
    )
    one_error(cli("validate", config, "model.trust_remote_code=true"), "model.trust_remote_code: true with")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    one_error(cli("validate", config, f"model.path={broken}"), f"{broken / 'config.json'} is not valid JSON")
    one_error(cli("train", config, f"model.path={broken}"), f"{broken / 'config.json'} is not valid JSON")


def test_pickle_only_weights_are_refused_unless_allowed(run_config, tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    one_error(cli("validate", run_config(), f"model.path={pickled}"), "holds only pickle weights (pytorch_model.bin)")
    allowed = cli("validate", "--no-env", run_config(), f"model.path={pickled}", "model.allow_pickle_weights=true")
    assert allowed.returncode == 0
    one_error(cli("chat", str(pickled), "--prompt", "hi"), "pass --allow-pickle-weights")


@pytest.mark.slow
def test_merge_never_writes_over_its_inputs_or_another_model(run_config, tiny_model_dir, tmp_path):
    assert cli("train", run_config(train={"max_steps": 1})).returncode == 0
    adapter = tmp_path / "out"
    before = {p.name: p.stat().st_mtime_ns for p in adapter.iterdir()}
    one_error(cli("merge", str(adapter), "--out", str(adapter)), "is (or holds) the adapter or a base model")
    one_error(cli("merge", str(adapter), "--out", str(tiny_model_dir)), "is (or holds) the adapter or a base model")
    one_error(cli("merge", str(adapter), "--out", str(tmp_path)), "is (or holds) the adapter or a base model")
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    one_error(cli("merge", str(adapter), "--out", str(other)), "already holds a model (config.json")
    assert {p.name: p.stat().st_mtime_ns for p in adapter.iterdir()} == before  # nothing written
    assert cli("merge", str(adapter), "--out", str(other), "--overwrite").returncode == 0


def test_chat_on_a_missing_or_empty_directory_is_one_line_and_quick(tmp_path):
    (tmp_path / "empty").mkdir()
    for target, message in (
        (tmp_path / "nowhere", "no such directory"),
        (tmp_path / "empty", "is empty"),
        ("Qwen/Qwen2.5-7B-Instruct", "no such directory"),
    ):
        start = time.perf_counter()
        proc = cli("chat", str(target), "--prompt", "hi")
        one_error(proc, message)
        assert time.perf_counter() - start < 20  # no hub retries


def test_stale_temporary_caches_are_cleaned(tmp_path, qwen3_dir):
    cache = tmp_path / "c"
    dead, live = cache / ".abc.tmp-4194301", cache / f".def.tmp-{os.getpid()}"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "data.arrow").write_bytes(b"partial")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    proc = cli("preprocess", "--tokenizer", str(qwen3_dir), "--data", str(path), f"data.cache_dir={cache}")
    assert proc.returncode == 0
    assert not dead.exists() and live.exists()  # a live process's temporary is left alone
