"""Predict peak GPU memory per process for a run config, and whether it fits a GPU.

Run: qwen-ft estimate configs/qwen1.5-7b-chat_lora.yaml [--gpus 8] [--gpu-memory 80] [--dtype bf16] [key=value ...]

Reads config.json from model.path (a directory holding just config.json is enough).
"""

from __future__ import annotations

import argparse

CHECKED = "within 15% of the peaks measured on an H100"
UNCHECKED = "hybrid Qwen3.5 and mixture-of-experts shapes not yet checked against a GPU's peak"
HELP = "predict peak GPU memory (weights, optimizer, gradients, activations, logits) for a config"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CONFIG [key=value ...] [--gpus] [--gpu-memory] [--dtype]."""
    p.add_argument("config", help="run YAML")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--gpus", type=int, default=1, help="processes (GPUs) in the run")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="what model.dtype=auto becomes")


def run(args: argparse.Namespace) -> int:
    """Print the breakdown; exit 0 when it fits, 1 when it does not."""
    from qwen_ft.api import estimate
    from qwen_ft.sizing.memory import GB, fits

    r = estimate(args.config, args.overrides, gpus=args.gpus, dtype=args.dtype)
    e = r.estimate
    print(
        f"{r.shape.params() / 1e9:.2f}B parameters, method {r.method}, {r.dtype}, {r.gpus} GPU(s), "
        f"ZeRO stage {r.stage}{' + optimizer offload' if r.offload else ''}"
    )
    for name, value in e.parts.items():
        print(f"  {name:<14} {value / GB:8.2f} GiB")
    for name, value in e.moments.items():
        print(f"  {name:<14} {value / GB:8.2f} GiB  (at different moments: only the larger counts)")
    ok = fits(e, args.gpu_memory)
    checked = UNCHECKED if r.shape.gdn or r.shape.moe else CHECKED
    print(
        f"  {'total':<14} {e.total / GB:8.2f} GiB per GPU: {'fits' if ok else 'does NOT fit'} a "
        f"{args.gpu_memory:g} GiB GPU (first-order estimate; {checked})"
    )
    return 0 if ok else 1
