"""GPTQ-quantize a (merged) model with ChatML calibration data; prints perplexity before and after.

Run: qwen-ft quantize runs/tiny-merged --out runs/tiny-gptq --bits 4 --group-size 128 \\
         --calibration data/example_chatml.jsonl [--eval-data FILE] [--samples 128]
"""

from __future__ import annotations

import argparse

HELP = "GPTQ-quantize a model (calibrated on ChatML conversations)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL_DIR --out --bits --group-size --calibration [--eval-data] [--samples]."""
    p.add_argument("model", help="full-precision model directory (e.g. a merged model)")
    p.add_argument("--out", required=True, help="output directory for the GPTQ checkpoint")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="bits per weight")
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="weights sharing one scale along each input column (-1: the whole column)",
    )
    p.add_argument("--calibration", required=True, help="conversation file (.json/.jsonl) for calibration")
    p.add_argument("--eval-data", help="held-out conversations for perplexity (default: the calibration file's last)")
    p.add_argument("--samples", type=int, default=128, help="calibration conversations to use")


def run(args: argparse.Namespace) -> int:
    """Quantize and report."""
    from qwen_ft.cli.args import hide_unused_stacks
    from qwen_ft.export.quantize import quantize_model

    hide_unused_stacks(args, {"gptq"})
    r = quantize_model(
        args.model, args.out, args.bits, args.group_size, args.calibration, args.samples, args.eval_data
    )
    print(
        f"calibrated on {r.calibration} conversations; perplexity on {r.held_out} held-out conversations: "
        f"{r.ppl_before:.3f} before, {r.ppl_after:.3f} after {args.bits}-bit GPTQ"
    )
    print(f"wrote GPTQ checkpoint to {r.out_dir}")
    return 0
