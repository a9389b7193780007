"""Write a tiny random Qwen checkpoint with the real Qwen vocabulary, for demos and tests.

Run: qwen-ft make-tiny-model runs/tiny-qwen3 [--family qwen3|qwen2|qwen3_5|qwen3_5_text] [--hidden 64] [--layers 2]
"""

from __future__ import annotations

import argparse

from qwen_ft.model.tiny import FAMILIES

HELP = "write a tiny random Qwen checkpoint (real vocabulary) for CPU demos and tests"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """OUT [--family] [--hidden] [--layers] [--seed]."""
    p.add_argument("out", help="output directory")
    p.add_argument(
        "--family",
        choices=FAMILIES,
        default="qwen3",
        help="architecture (qwen3_5: the composite Qwen3.5/3.6 layout with a tiny vision tower)",
    )
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def run(args: argparse.Namespace) -> int:
    """Build and save the model."""
    from qwen_ft.cli.args import hide_unused_stacks
    from qwen_ft.model.tiny import make_tiny_model

    hide_unused_stacks(args, set())
    out = make_tiny_model(args.out, args.family, args.hidden, args.layers, args.seed)
    print(f"wrote tiny {args.family} model (hidden {args.hidden}, {args.layers} layers, random weights) to {out}")
    return 0
