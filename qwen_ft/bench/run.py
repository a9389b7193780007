"""Benchmark orchestration: random checkpoints and workloads written once, then one process per case
(method x length x implementation) so peaks do not mix; `qwen-ft bench` parses arguments and calls
`run_benchmark`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen_ft.errors import QwenFtError

NEEDS = {"qlora_bnb": "bnb", "qlora_gptq": "gptq"}


@dataclass(frozen=True)
class BenchRequest:
    """What to benchmark: `qwen-ft bench`'s options."""

    shape: str = "tiny"
    methods: tuple[str, ...] = ("lora",)
    lengths: tuple[int, ...] = (256,)
    steps: int = 3
    warmup: int = 1
    baseline: bool = True
    work_dir: str = ".cache/qwen-ft/bench"
    json_path: str | None = None
    peak_tflops: float | None = None
    overrides: tuple[str, ...] = ()  # config overrides for the qwen-ft runs (the baseline keeps its defaults)
    micro_batch: int = 1  # sequences per micro-batch, both implementations (8 per optimizer step)
    ours: bool = True  # run the qwen-ft cases (False: the baseline alone)


def check_request(req: BenchRequest) -> None:
    """Refuse unknown names, bad counts and missing extras before anything is written.

    Raises:
        QwenFtError / MissingDependency: naming the value and the fix.
    """
    from qwen_ft import deps
    from qwen_ft.bench.shapes import SHAPES
    from qwen_ft.bench.workload import METHODS

    bad = [m for m in req.methods if m not in METHODS]
    if req.shape not in SHAPES or bad or not req.lengths or min(req.lengths) < 64:
        raise QwenFtError(
            f"--shape {req.shape} (choose {', '.join(SHAPES)}), --methods {','.join(req.methods)} "
            f"(choose {', '.join(METHODS)}), --lengths {list(req.lengths)} (each >= 64)"
        )
    if req.steps < 1 or req.warmup < 0:
        raise QwenFtError(f"--steps {req.steps} must be >= 1 and --warmup {req.warmup} >= 0")
    if req.micro_batch not in (1, 2, 4, 8):
        raise QwenFtError(f"--micro-batch {req.micro_batch}: choose 1, 2, 4 or 8 (a step is 8 sequences)")
    if not (req.ours or req.baseline):
        raise QwenFtError("nothing to run: --baseline-only with the baseline turned off")
    for m in req.methods:
        if m in NEEDS:
            deps.require(NEEDS[m], f"benchmark method {m}")


def base_checkpoint(work: Path, shape: str, gptq: bool) -> Path:
    """The random checkpoint of `shape` (dense or GPTQ), written once and reused."""
    import torch

    from qwen_ft.bench.checkpoint import write_random_checkpoint
    from qwen_ft.files import atomic_dir

    out = work / f"model-{shape}-{'gptq' if gptq else 'dense'}"
    if (out / "config.json").is_file():
        return out
    print(f"writing random {shape} checkpoint ({'GPTQ int4' if gptq else 'dense'}) to {out}", flush=True)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with atomic_dir(out) as tmp:
        write_random_checkpoint(shape, tmp, dtype, gptq=gptq)
    return out


def case_files(work: Path, length: int, n: int, tok) -> dict:
    """Workload for one length: conversations for qwen-ft, token rows for the baseline, learned tokens/row."""
    from qwen_ft.bench.workload import write_workload
    from qwen_ft.data.chatml import IGNORE_INDEX

    convs, rows = write_workload(tok, length, n, work / f"data-{length}")
    first = json.loads(rows.open().readline())
    learned = sum(1 for x in first["labels"][1:] if x != IGNORE_INDEX)
    return {"conversations": convs, "rows": rows, "learned": learned}


def write_case(work: Path, base: dict) -> tuple[Path, dict]:
    """The case JSON (and its run YAML) under work/cases/NAME/; returns the folder and the full case."""
    from dataclasses import fields

    import yaml

    from qwen_ft.bench.workload import Settings, run_sections

    name = f"{base['shape']}-{base['method']}-{base['length']}-{base['impl']}"
    d = work / "cases" / name
    d.mkdir(parents=True, exist_ok=True)
    settings = Settings(**{f.name: base[f.name] for f in fields(Settings)})  # --micro-batch included
    sections = run_sections(
        base["method"], base["model_dir"], base["conversations"], base["length"], base["steps"], d, settings
    )
    (d / "run.yaml").write_text(yaml.safe_dump(sections, sort_keys=False))
    case = {
        **base,
        "config": str(d / "run.yaml"),
        "work": str(d),
        "result": str(d / "result.json"),
        "estimate_gb": predicted_gb(d / "run.yaml", base["shape"], base["overrides"]),
    }
    (d / "case.json").write_text(json.dumps(case, indent=1))
    return d, case


def predicted_gb(config: Path, shape: str, overrides: list[str]) -> float:
    """What `qwen-ft estimate` predicts for the case's run config on one device (bf16 on a GPU)."""
    import torch

    from qwen_ft.bench.shapes import shape_config
    from qwen_ft.config.load import load_config
    from qwen_ft.model.shape import Shape
    from qwen_ft.recipe.estimate import peak_of
    from qwen_ft.sizing.memory import GB

    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    cfg = load_config(str(config), overrides)  # also refuses a bad override before anything runs
    return peak_of(cfg, Shape.from_config(shape_config(shape)), dtype, 1, 0, False).total / GB


def run_case(d: Path) -> dict:
    """Run one case in a fresh process; its output goes to d/log.txt."""
    result = d / "result.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with (d / "log.txt").open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "qwen_ft.bench.worker", str(d / "case.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
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


def plan_cases(req: BenchRequest, work: Path) -> list[dict]:
    """One base case per (length, method, implementation), with checkpoints and data in place."""
    from dataclasses import asdict

    from qwen_ft.bench.shapes import shape_config
    from qwen_ft.bench.workload import Settings
    from qwen_ft.model.shape import Shape, lora_params
    from qwen_ft.tokenizer import load_tokenizer

    s = Settings(micro_batch_size=req.micro_batch, grad_accum=8 // req.micro_batch)
    methods, shape = req.methods, Shape.from_config(shape_config(req.shape))
    models = {g: base_checkpoint(work, req.shape, g) for g in {m == "qlora_gptq" for m in methods}}
    tok = load_tokenizer(next(iter(models.values())))
    steps = req.warmup + req.steps
    adapters = lora_params(shape, s.lora_r)
    impls = (["qwen-ft"] if req.ours else []) + (["baseline"] if req.baseline else [])
    ours = list(req.overrides)
    cases = []
    for length in req.lengths:
        files = case_files(work, length, steps * s.micro_batch_size * s.grad_accum, tok)
        for method in methods:
            for impl in impls:
                cases.append(
                    {
                        **asdict(s),
                        "impl": impl,
                        "shape": req.shape,
                        "method": method,
                        "length": length,
                        "steps": steps,
                        "warmup": req.warmup,
                        "overrides": ours if impl == "qwen-ft" else [],
                        "model_dir": str(models[method == "qlora_gptq"]),
                        "conversations": str(files["conversations"]),
                        "rows": str(files["rows"]),
                        "learned_per_step": files["learned"] * s.micro_batch_size * s.grad_accum,
                        "adapter_params": 0 if method == "full" else adapters,
                        "learning_rate": s.learning_rate_for(method),
                    }
                )
    return cases


def run_benchmark(req: BenchRequest, echo: Callable[[str], None] = print) -> tuple[list[dict], Path]:
    """Run every case (progress through `echo`); returns the records and the JSON written.

    Raises:
        QwenFtError / MissingDependency: a bad request, before anything is written.
    """
    from qwen_ft.bench.flops import device_peak_tflops
    from qwen_ft.bench.report import record, write_json
    from qwen_ft.bench.shapes import shape_config
    from qwen_ft.model.shape import Shape

    check_request(req)
    work = Path(req.work_dir)
    cases = plan_cases(req, work)
    shape, records, peak = Shape.from_config(shape_config(req.shape)), [], req.peak_tflops
    for i, base in enumerate(cases, 1):
        t0 = time.perf_counter()
        folder, case = write_case(work, base)
        result = run_case(folder)
        peak = peak or device_peak_tflops(result.get("device") or "")
        records.append(record(case, result, shape, peak))
        r = records[-1]
        what = r["error"] or f"{r['seconds_per_step']:.2f} s/8 seq, peak {r['peak_gb']:.2f} GiB"
        echo(
            f"[{i}/{len(cases)}] {case['shape']} {case['method']} {case['length']} {case['impl']}: {what} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    out = Path(req.json_path or work / f"bench-{req.shape}.json")
    device = next((r["device"] for r in records if r.get("device")), "unknown")
    write_json(
        out,
        {
            "date": time.strftime("%Y-%m-%d"),
            "device": device,
            "peak_tflops": peak,
            "versions": versions(),
            "command": " ".join(sys.argv),
            "overrides": list(req.overrides),
            "micro_batch": req.micro_batch,
        },
        records,
    )
    return records, out
