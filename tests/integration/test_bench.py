"""`qwen-ft bench` on the tiny shape (CPU smoke): both implementations run the real code and report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwen_ft.cli.main import main


@pytest.mark.slow
def test_bench_tiny_lora_against_baseline(tmp_path, capsys):
    """Both implementations at --micro-batch 2 (2 sequences x 4 accumulation each), through the real code."""
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--shape",
            "tiny",
            "--methods",
            "lora",
            "--lengths",
            "96",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--micro-batch",
            "2",
            "--work-dir",
            str(tmp_path),
            "--json",
            str(out),
            "--peak-tflops",
            "1",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads(out.read_text())
    results = {r["impl"]: r for r in report["results"]}
    assert set(results) == {"qwen-ft", "baseline"} and report["micro_batch"] == 2
    for r in results.values():
        assert r["error"] is None and r["device"] == "cpu"
        assert len(r["step_seconds"]) == 2 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_gb"] > 0
    assert results["qwen-ft"]["estimate_gb"] > 0  # the estimator's prediction stands beside the measured peak
    assert report["speedup_vs_baseline"][0]["tokens_per_s_ratio"] > 0
    assert "torch" in report["versions"] and "tiny  lora" in printed
    # The qwen-ft case trained through the real loop on exact 96-token rows, 2 per micro-batch.
    log = (tmp_path / "cases/tiny-lora-96-qwen-ft/log.txt").read_text()
    assert "plan: 3 steps" in log and "2 rows x 4 accumulation" in log
    case = json.loads((tmp_path / "cases/tiny-lora-96-baseline/case.json").read_text())
    assert (case["micro_batch_size"], case["grad_accum"]) == (2, 4)


@pytest.mark.slow
@pytest.mark.extras("gptqmodel")
def test_bench_tiny_gptq_qlora(tmp_path, capsys):
    rc = main(
        [
            "bench",
            "--shape",
            "tiny",
            "--methods",
            "qlora_gptq",
            "--lengths",
            "80",
            "--steps",
            "1",
            "--no-baseline",
            "--work-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0, capsys.readouterr().out
    (r,) = json.loads((tmp_path / "bench-tiny.json").read_text())["results"]
    assert r["error"] is None and r["method"] == "qlora_gptq" and r["seconds_per_step"] > 0


@pytest.mark.slow
def test_bench_baseline_only_runs_the_trainer_case_alone(tmp_path, capsys):
    rc = main(
        [
            "bench",
            "--methods",
            "lora",
            "--lengths",
            "80",
            "--steps",
            "1",
            "--micro-batch",
            "2",
            "--baseline-only",
            "--work-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "bench-tiny.json").read_text())
    (r,) = report["results"]
    assert r["impl"] == "baseline" and r["error"] is None and report["micro_batch"] == 2
    assert not (tmp_path / "cases/tiny-lora-80-qwen-ft").exists()


def test_bench_refuses_bad_requests_before_writing(tmp_path, capsys):
    rc = main(["bench", "--methods", "lora,dora", "--work-dir", str(tmp_path / "w")])
    assert rc == 1 and "choose lora, lora_emb" in capsys.readouterr().err
    assert main(["bench", "--lengths", "256,abc", "--work-dir", str(tmp_path / "w")]) == 1
    assert "--lengths '256,abc': give whole numbers" in capsys.readouterr().err
    assert main(["bench", "--steps", "0", "--work-dir", str(tmp_path / "w")]) == 1
    assert "--steps 0 must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--micro-batch", "3", "--work-dir", str(tmp_path / "w")]) == 1
    assert "--micro-batch 3: choose 1, 2, 4 or 8" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_bench_reports_a_failing_case_without_crashing(tmp_path, capsys):
    from qwen_ft.bench.checkpoint import write_random_checkpoint

    model = write_random_checkpoint("tiny", tmp_path / "model-tiny-dense")
    (model / "model-00001-of-00001.safetensors").write_bytes(b"not safetensors")  # a damaged cached checkpoint
    rc = main(
        ["bench", "--methods", "lora", "--lengths", "80", "--steps", "1", "--no-baseline", "--work-dir", str(tmp_path)]
    )
    printed = capsys.readouterr()
    assert rc == 1 and "tiny  lora" in printed.out
    (r,) = json.loads((tmp_path / "bench-tiny.json").read_text())["results"]
    assert r["error"] and "Traceback" in (tmp_path / "cases/tiny-lora-80-qwen-ft/log.txt").read_text()


def test_cpu_peak_is_the_workers_own_not_its_parents():
    """A benchmark worker's CPU peak must not start at the RSS of the process that spawned it
    (Linux's ru_maxrss carries it across fork + exec)."""
    from qwen_ft.bench.measure import peak_rss_bytes

    held = bytearray(1024**3)  # the parent: 1 GiB more resident
    held[::4096] = b"x" * len(held[::4096])
    code = "from qwen_ft.bench.measure import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    parent = peak_rss_bytes()
    del held
    assert child < parent - 0.5 * 1024**3, (parent, child)
