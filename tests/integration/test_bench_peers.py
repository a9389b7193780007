"""scripts/bench_cpu_peers.py: qwen-ft and QwenLM's pad-to-max recipe side by side in one run (TRL too
where it is installed), each in its own process; the speed-up arithmetic."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, load_script

SCRIPT = REPO / "scripts/bench_cpu_peers.py"


def test_speedups_are_peer_seconds_over_ours():
    runs = {
        "qwen-ft": [{"process_s": 10.0, "train_s": 4.0}, {"process_s": 12.0, "train_s": 6.0}],
        "qwenlm": [{"process_s": 30.0, "train_s": 25.0}, {"process_s": 34.0, "train_s": 27.0}],
    }
    out = load_script("bench_cpu_peers").summary(runs)
    assert out["mean"]["qwen-ft"] == {"process_s": 11.0, "train_s": 5.0}
    assert out["speedup"]["qwenlm"] == pytest.approx(
        {"loop_vs_loop": 26.0 / 5.0, "process_vs_process": 32.0 / 11.0, "our_process_vs_their_loop": 26.0 / 11.0}
    )


@pytest.mark.slow
def test_qwen_ft_in_process_and_qwenlm_in_its_own_process(tmp_path):
    """qwen-ft's worker times its own training loop; a peer runs in a fresh process, timed from outside."""
    bench = load_script("bench_cpu_peers")
    bench.setup(tmp_path, 4)
    (tmp_path / "work").mkdir()
    loop_s = bench.run_qwen_ft(tmp_path, tmp_path / "work", 128)
    from qwen_ft.train import loop

    assert loop_s > 0 and loop.train.__name__ == "train"  # the timing wrapper is removed again
    assert (tmp_path / "work/out/adapter_model.safetensors").is_file()
    got = bench.one_process("qwenlm", tmp_path, 128, None)
    assert 0 < got["train_s"] < got["process_s"]
    assert got["code"] == str(REPO / "qwen_ft")  # the worker ran this checkout


def test_before_must_be_a_checkout(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--before", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "no qwen_ft package there" in done.stderr
