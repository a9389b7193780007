"""A full disk, for real: writes past a real per-file size limit (RLIMIT_FSIZE, set in the child process
with SIGXFSZ ignored, so the write fails with EFBIG as it would on a full disk) and, where the tests run
as root, on a real tmpfs that fills up (ENOSPC). Each write stops with one `error:` line naming the path
and the space, leaves no temporary directory, and loses nothing that was complete before."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # timed, signalled or killed processes: run alone

# The child: ignore SIGXFSZ (else the kernel kills it), set the limit at once ("-") or once a path
# exists (a thread polls for it: the run writes freely until then), then run the qwen-ft CLI.
LIMITED = textwrap.dedent(
    """
    import resource, signal, sys, threading, time
    from pathlib import Path

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit, after, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    def watch():
        while not Path(after).exists():
            time.sleep(0.002)
        cap()

    cap() if after == "-" else threading.Thread(target=watch, daemon=True).start()
    from qwen_ft.cli.main import main

    sys.exit(main(argv))
    """
)


def qwen_ft(*argv: str, limit: int | None = None, after: str = "-") -> subprocess.CompletedProcess:
    """`qwen-ft ARGV` in a child process, under a per-file size limit of `limit` bytes when given."""
    cmd = [sys.executable, "-c", LIMITED, str(limit), after] if limit else [sys.executable, "-m", "qwen_ft.cli.main"]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, cwd=REPO, timeout=600)


def refused_cleanly(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The run stopped with exit 1 and one error line naming what it says, never a traceback."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr[proc.stderr.index("error: ") :]
    for needle in needles:
        assert needle in err, err
    print(err)  # what the user sees (pytest -s)
    return err


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def same_adapter(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


STEPS = {"max_steps": 6, "save_steps": 2, "save_total_limit": 3}  # checkpoints at 2 and 4, the final save at 6


def test_a_checkpoint_past_the_file_size_limit_stops_cleanly_and_the_run_resumes_exactly(run_config, tmp_path):
    from qwen_ft.train.resume import resume_path

    ref = run_config(train={**STEPS, "output_dir": str(tmp_path / "ref")})
    assert qwen_ft("train", ref).returncode == 0
    adapter = tmp_path / "ref" / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"
    limit = adapter.stat().st_size // 2  # the TensorBoard file and small files stay under it
    assert max(f.stat().st_size for f in (tmp_path / "ref" / "tensorboard").rglob("*") if f.is_file()) < limit

    out = tmp_path / "out"
    config = run_config(train={**STEPS, "resume": "auto"})
    first = out / "checkpoints" / "checkpoint-2"
    err = refused_cleanly(
        qwen_ft("train", config, limit=limit, after=str(first)),
        f"writing {out / 'checkpoints' / 'checkpoint-4'} failed: a file grew past the per-file size limit",
        "free on its filesystem, about",
        "files limited to",
        f"the last good checkpoint is {first}",
        "resume with train.resume: auto",
    )
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"], err
    assert not temporaries(out) and not (out / "adapter_model.safetensors").exists()
    assert resume_path("auto", str(out)) == first  # intact: its sizes and hashes verify

    resumed = qwen_ft("train", config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: from" in resumed.stdout and "checkpoint-2 at step 2" in resumed.stdout
    assert same_adapter(tmp_path / "ref", out)


def test_the_final_save_past_the_file_size_limit_leaves_no_half_model_and_the_run_resumes(run_config, tmp_path):
    """The limit set once the last checkpoint (step 4) exists: the final save (step 6) fails. Nothing of it
    reaches output_dir (it is written into .final.tmp-PID first), and the rerun resumes from checkpoint-4."""
    from qwen_ft.train.resume import resume_path

    out = tmp_path / "out"
    config = run_config(train={**STEPS, "resume": "auto"})
    last = out / "checkpoints" / "checkpoint-4"
    refused_cleanly(
        qwen_ft("train", config, limit=8192, after=str(last / "trainer_state.json")),  # the logs stay under 8 KB
        f"writing {out} failed: a file grew past the per-file size limit",
        f"the last good checkpoint is {last}",
    )
    assert not temporaries(out) and not (out / "adapter_model.safetensors").exists()
    assert resume_path("auto", str(out)) == last
    resumed = qwen_ft("train", config)
    assert resumed.returncode == 0 and "checkpoint-4 at step 4" in resumed.stdout, resumed.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()


@pytest.fixture
def tmpfs(tmp_path):
    """A real tmpfs (root only): yields (mount point, resize(bytes))."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE tests cover a full disk without it")
    point = tmp_path / "tmpfs"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(point)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"this container may not mount a tmpfs: {mounted.stderr.decode().strip()}")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)

    try:
        yield point, resize
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_disk_that_fills_up_keeps_the_last_checkpoint_and_the_run_resumes(run_config, tmp_path, tmpfs):
    point, resize = tmpfs
    ref = run_config(train={**STEPS, "output_dir": str(tmp_path / "ref")})
    assert qwen_ft("train", ref).returncode == 0
    one = sum(f.stat().st_size for f in (tmp_path / "ref" / "checkpoints" / "checkpoint-2").rglob("*"))
    out = point / "out"
    config = run_config(train={**STEPS, "resume": "auto", "output_dir": str(out)})
    resize(int(one * 1.6))  # room for one checkpoint and the logs, not for a second beside it
    err = refused_cleanly(
        qwen_ft("train", config),
        f"writing {out / 'checkpoints' / 'checkpoint-4'} failed: no space left on the device",
        "free on its filesystem",
        "the last good checkpoint is",
    )
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"], err
    assert not temporaries(out)
    resize(64 << 20)  # space freed
    resumed = qwen_ft("train", config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_adapter(tmp_path / "ref", out)


def test_merge_past_the_limit_writes_nothing_and_the_rerun_works(run_config, tmp_path):
    config = run_config(train={"max_steps": 1})
    assert qwen_ft("train", config).returncode == 0
    merged = tmp_path / "merged"
    refused_cleanly(
        qwen_ft("merge", str(tmp_path / "out"), "--out", str(merged), limit=1 << 20),
        f"writing {merged} failed: a file grew past the per-file size limit",
        "needed, files limited to 1.0 MiB (ulimit -f)",
        "run the command again",
    )
    assert not merged.exists() and not temporaries(tmp_path)
    again = qwen_ft("merge", str(tmp_path / "out"), "--out", str(merged))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (merged / "model.safetensors").is_file()


def test_the_tokenized_cache_past_the_limit_leaves_no_temporary_and_is_built_on_the_rerun(run_config, tmp_path):
    config = run_config()
    cache = tmp_path / "cache"
    refused_cleanly(qwen_ft("preprocess", "--config", config, limit=8 << 10), f"writing {cache}", "a file grew past")
    assert not temporaries(cache)
    again = qwen_ft("preprocess", "--config", config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "conversations read      84" in again.stdout


@pytest.mark.parametrize("writer", ["tensorboard", "loss.png"])
def test_logs_past_the_limit_stop_with_one_error(run_config, tmp_path, writer):
    """TensorBoard's events file grows with every logged step; the loss plot is written last."""
    steps = 40 if writer == "tensorboard" else 4  # a long events file, or a short one beside the plot
    config = run_config(train={"max_steps": steps, "save_steps": 0, "logging_steps": 1})
    assert (
        qwen_ft("preprocess", "--config", config).returncode == 0
    )  # the cache exists: the run itself writes only logs first
    out = tmp_path / "out"
    if writer == "tensorboard":
        proc = qwen_ft("train", config, limit=2 << 10)
        err = refused_cleanly(proc, f"writing {out / 'tensorboard'} failed", "resume with train.resume: auto")
        assert not (out / "adapter_model.safetensors").exists()
    else:  # the limit comes once the model is saved: only the plot is left to write
        proc = qwen_ft("train", config, limit=8 << 10, after=str(out / "train_history.json"))
        err = refused_cleanly(proc, f"writing {out / 'loss.png'} failed", "The trained model is saved in full")
        assert (out / "adapter_model.safetensors").is_file()
    assert "Exception in thread" not in proc.stderr, err
    assert not temporaries(out)
