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

from qwen_ft.errors import QwenFtError

HELP = "benchmark speed and memory at a real Qwen shape (and against Trainer + peft)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--shape, --methods, --lengths, --steps, --warmup, --no-baseline/--baseline-only, --micro-batch,
    --work-dir, --json, --peak-tflops, key=value overrides."""
    from qwen_ft.bench.shapes import SHAPES  # names only: no heavy imports

    p.add_argument("--shape", default="tiny", help="one of: " + ", ".join(SHAPES))
    p.add_argument(
        "--methods",
        default="lora,lora_emb,qlora_bnb,qlora_gptq",
        help="comma list of lora, lora_emb, qlora_bnb, qlora_gptq, full",
    )
    p.add_argument("--lengths", default="256,2048", help="comma list of sequence lengths")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps (8 sequences each)")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not measured")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--no-baseline", action="store_true", help="skip the transformers Trainer + peft runs")
    who.add_argument("--baseline-only", action="store_true", help="run only the transformers Trainer + peft cases")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=1,
        help="sequences per micro-batch for both implementations (1, 2, 4 or 8); accumulation keeps 8 "
        "sequences per optimizer step (QwenLM's table: 1)",
    )
    p.add_argument("--work-dir", default=".cache/qwen-ft/bench", help="random checkpoints, data and case logs")
    p.add_argument("--json", default=None, help="results file (default: WORK_DIR/bench-SHAPE.json)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (GPUs are recognised)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides for the qwen-ft runs, e.g. model.checkpoint_fraction=0.5 (the baseline "
        "keeps its defaults)",
    )


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


def run(args: argparse.Namespace) -> int:
    """Run every case, print the table and the goals; exit 1 when every case failed."""
    from qwen_ft.bench.report import estimate_lines, goal_lines, table
    from qwen_ft.bench.run import BenchRequest, run_benchmark

    req = BenchRequest(
        args.shape,
        tuple(_csv(args.methods)),
        tuple(_lengths(args.lengths)),
        args.steps,
        args.warmup,
        not args.no_baseline,
        args.work_dir,
        args.json,
        args.peak_tflops,
        tuple(args.overrides),
        args.micro_batch,
        not args.baseline_only,
    )
    records, out = run_benchmark(req, echo=lambda line: print(line, flush=True))
    print(table(records))
    for line in goal_lines(records) + estimate_lines(records):
        print(line)
    print(f"results: {out}")
    return 1 if all(r.get("error") for r in records) else 0
