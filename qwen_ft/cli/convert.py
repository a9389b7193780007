"""Convert a Qwen v1 checkpoint (model_type "qwen", remote code) to transformers' native Qwen2 layout.

Run: qwen-ft convert /models/Qwen-7B-Chat --out /models/Qwen-7B-Chat-native [--dtype bf16]

Dense checkpoints become bf16/fp16/fp32 safetensors; GPTQ Int4/Int8 checkpoints stay GPTQ. The
tokenizer becomes tokenizer.json with identical ids; a generation config is written.
"""

from __future__ import annotations

import argparse

HELP = "convert a Qwen v1 checkpoint to the native Qwen2 layout (no remote code)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """SRC --out DST [--dtype]."""
    p.add_argument("src", help="Qwen v1 checkpoint directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="dense weight dtype; auto: the checkpoint's (GPTQ tensors are kept as they are)",
    )


def run(args: argparse.Namespace) -> int:
    """Convert and say where."""
    from qwen_ft.model.qwen_v1 import convert_checkpoint

    out = convert_checkpoint(args.src, args.out, args.dtype)
    print(f"wrote native Qwen2 checkpoint (weights, config.json, tokenizer.json, generation_config.json) to {out}")
    return 0
