"""Benchmark fine-tuning at the shape of a real Qwen model against Trainer + peft and QwenLM's table.

Run: qwen-ft bench --shape 7b --methods lora,lora_emb,qlora_bnb,qlora_gptq --lengths 256,2048,8192
     qwen-ft bench --shape tiny --methods lora --lengths 128 --steps 2      (CPU smoke, < 1 minute)

Random weights with the exact shape (1.8b, 7b, 14b, tiny) are written once under --work-dir; each
case (method x length x implementation) runs batch 1 x accumulation 8 in its own process. Prints
peak memory, seconds per 8 sequences, tokens/s and MFU beside QwenLM's A100 figures, the speed-up
over Trainer + peft, and writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qwen_ft.errors import QwenFtError

HELP = "benchmark speed and memory at a real Qwen shape (and against Trainer + peft)"
NEEDS = {"qlora_bnb": "bnb", "qlora_gptq": "gptq"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--shape, --methods, --lengths, --steps, --warmup, --no-baseline, --work-dir, --json, --peak-tflops,
    key=value overrides."""
    p.add_argument("--shape", default="tiny", help="tiny, 1.8b, 7b or 14b")
    p.add_argument("--methods", default="lora,lora_emb,qlora_bnb,qlora_gptq",
                   help="comma list of lora, lora_emb, qlora_bnb, qlora_gptq, full")
    p.add_argument("--lengths", default="256,2048", help="comma list of sequence lengths")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps (8 sequences each)")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not measured")
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers Trainer + peft runs")
    p.add_argument("--work-dir", default=".cache/qwen-ft/bench", help="random checkpoints, data and case logs")
    p.add_argument("--json", default=None, help="results file (default: WORK_DIR/bench-SHAPE.json)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (GPUs are recognised)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides for the qwen-ft runs, e.g. model.checkpoint_fraction=0.5 (the baseline "
                        "keeps its defaults)")


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _lengths(text: str) -> list[int]:
    """--lengths as integers.

    Raises:
        QwenFtError: a value that is not a whole number.
    """
    try:
        return [int(x) for x in _csv(text)]
    except ValueError:
        raise QwenFtError(f"--lengths {text!r}: give whole numbers separated by commas, e.g. 256,2048") from None


def check_request(shape: str, methods: list[str], lengths: list[int]) -> None:
    """Refuse unknown names and missing extras before anything is written.

    Raises:
        QwenFtError / MissingDependency: naming the value and the fix.
    """
    from qwen_ft import deps
    from qwen_ft.bench.shapes import SHAPES
    from qwen_ft.bench.workload import METHODS

    bad = [m for m in methods if m not in METHODS]
    if shape not in SHAPES or bad or not lengths or min(lengths) < 64:
        raise QwenFtError(f"--shape {shape} (choose {', '.join(SHAPES)}), --methods {','.join(methods)} "
                          f"(choose {', '.join(METHODS)}), --lengths {lengths} (each >= 64)")
    for m in methods:
        if m in NEEDS:
            deps.require(NEEDS[m], f"benchmark method {m}")


def base_checkpoint(work: Path, shape: str, gptq: bool) -> Path:
    """The random checkpoint of `shape` (dense or GPTQ), written once and reused."""
    import shutil

    import torch

    from qwen_ft.bench.checkpoint import write_random_checkpoint

    out = work / f"model-{shape}-{'gptq' if gptq else 'dense'}"
    if (out / "config.json").is_file():
        return out
    print(f"writing random {shape} checkpoint ({'GPTQ int4' if gptq else 'dense'}) to {out}", flush=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    write_random_checkpoint(shape, tmp, dtype, gptq=gptq)
    shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier write of this cache entry
    tmp.rename(out)
    return out


def case_files(work: Path, length: int, n: int, tok) -> dict:
    """Workload for one length: conversations for qwen-ft, token rows for the baseline, learned tokens/row."""
    from qwen_ft.bench.workload import write_workload

    convs, rows = write_workload(tok, length, n, work / f"data-{length}")
    first = json.loads(rows.open().readline())
    learned = sum(1 for x in first["labels"][1:] if x != -100)
    return {"conversations": convs, "rows": rows, "learned": learned}


def write_case(work: Path, base: dict) -> tuple[Path, dict]:
    """The case JSON (and its run YAML) under work/cases/NAME/; returns the folder and the full case."""
    import yaml

    from qwen_ft.bench.workload import run_sections

    name = f"{base['shape']}-{base['method']}-{base['length']}-{base['impl']}"
    d = work / "cases" / name
    d.mkdir(parents=True, exist_ok=True)
    sections = run_sections(base["method"], base["model_dir"], base["conversations"], base["length"],
                            base["steps"], d)
    (d / "run.yaml").write_text(yaml.safe_dump(sections, sort_keys=False))
    case = {**base, "config": str(d / "run.yaml"), "work": str(d), "result": str(d / "result.json"),
            "estimate_gb": predicted_gb(d / "run.yaml", base["shape"], base["overrides"])}
    (d / "case.json").write_text(json.dumps(case, indent=1))
    return d, case


def predicted_gb(config: Path, shape: str, overrides: list[str]) -> float:
    """What `qwen-ft estimate` predicts for the case's run config on one device (bf16 on a GPU)."""
    import torch

    from qwen_ft.bench.shapes import shape_config
    from qwen_ft.config.load import load_config
    from qwen_ft.train.memory import GB, Shape, estimate

    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    cfg = load_config(str(config), overrides)  # also refuses a bad override before anything runs
    return estimate(cfg, Shape.from_config(shape_config(shape)), dtype, 1, 0, False).total / GB


def run_case(d: Path) -> dict:
    """Run one case in a fresh process; its output goes to d/log.txt."""
    result = d / "result.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with (d / "log.txt").open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "qwen_ft.cli.bench_worker", str(d / "case.json")],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.is_file():
        return json.loads(result.read_text())
    return {"error": f"worker exited {proc.returncode} (see {d / 'log.txt'})"}


def versions() -> dict[str, str]:
    """Installed versions of what the figures depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("qwen-ft", "torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "flash-attn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def plan_cases(args, methods: list[str], lengths: list[int], work: Path) -> list[dict]:
    """One base case per (length, method, implementation), with checkpoints and data in place."""
    from dataclasses import asdict

    from qwen_ft.bench.shapes import shape_config
    from qwen_ft.bench.workload import Settings
    from qwen_ft.tokenizer import load_tokenizer
    from qwen_ft.train.memory import Shape, lora_params

    s, shape = Settings(), Shape.from_config(shape_config(args.shape))
    models = {g: base_checkpoint(work, args.shape, g) for g in {m == "qlora_gptq" for m in methods}}
    tok = load_tokenizer(next(iter(models.values())))
    steps = args.warmup + args.steps
    adapters = lora_params(shape, s.lora_r)
    impls = ["qwen-ft"] + ([] if args.no_baseline else ["baseline"])
    cases = []
    for length in lengths:
        files = case_files(work, length, steps * s.micro_batch_size * s.grad_accum, tok)
        for method in methods:
            for impl in impls:
                cases.append({
                    **asdict(s), "impl": impl, "shape": args.shape, "method": method, "length": length,
                    "steps": steps, "warmup": args.warmup, "overrides": args.overrides if impl == "qwen-ft" else [],
                    "model_dir": str(models[method == "qlora_gptq"]),
                    "conversations": str(files["conversations"]), "rows": str(files["rows"]),
                    "learned_per_step": files["learned"] * s.micro_batch_size * s.grad_accum,
                    "adapter_params": 0 if method == "full" else adapters,
                    "learning_rate": s.learning_rate_for(method)})
    return cases


def run(args: argparse.Namespace) -> int:
    """Run every case, print the table and the goals, write the JSON."""
    from qwen_ft.bench.flops import device_peak_tflops
    from qwen_ft.bench.report import estimate_lines, goal_lines, record, table, write_json
    from qwen_ft.bench.shapes import shape_config
    from qwen_ft.train.memory import Shape

    methods, lengths = _csv(args.methods), _lengths(args.lengths)
    check_request(args.shape, methods, lengths)
    if args.steps < 1 or args.warmup < 0:
        raise QwenFtError(f"--steps {args.steps} must be >= 1 and --warmup {args.warmup} >= 0")
    work = Path(args.work_dir)
    cases = plan_cases(args, methods, lengths, work)
    shape, records, peak = Shape.from_config(shape_config(args.shape)), [], args.peak_tflops
    for i, base in enumerate(cases, 1):
        t0 = time.perf_counter()
        folder, case = write_case(work, base)
        result = run_case(folder)
        peak = peak or device_peak_tflops(result.get("device") or "")
        records.append(record(case, result, shape, peak))
        r = records[-1]
        what = r["error"] or f"{r['seconds_per_step']:.2f} s/8 seq, peak {r['peak_gb']:.2f} GB"
        print(f"[{i}/{len(cases)}] {case['shape']} {case['method']} {case['length']} {case['impl']}: {what} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(table(records))
    for line in goal_lines(records) + estimate_lines(records):
        print(line)
    out = Path(args.json or work / f"bench-{args.shape}.json")
    device = next((r["device"] for r in records if r.get("device")), "unknown")
    write_json(out, {"date": time.strftime("%Y-%m-%d"), "device": device, "peak_tflops": peak,
                     "versions": versions(), "command": " ".join(sys.argv),
                     "overrides": args.overrides}, records)
    print(f"results: {out}")
    return 1 if all(r.get("error") for r in records) else 0
