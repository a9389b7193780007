"""Merge a LoRA output into its base: a standalone model for inference, loadable by stock transformers.

Run: qwen-ft merge runs/tiny-lora --out runs/tiny-merged [--base DIR] [--dtype auto|bf16|fp16|fp32]
     [--for vllm|sglang|llama.cpp|ollama ...]

The base comes from the adapter's manifest.json unless --base is given. The merge prints the
max |logit diff| between merged and base+adapter on a probe prompt and fails above tolerance.
"""

from __future__ import annotations

import argparse

HELP = "merge a LoRA adapter into its base model (self-checked)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """ADAPTER_DIR --out DIR [--base DIR] [--dtype] [--for SERVER ...]."""
    from qwen_ft.export.servers import SERVERS

    p.add_argument("adapter", help="a qwen-ft LoRA output (or checkpoint) directory")
    p.add_argument("--out", required=True, help="where the merged model goes")
    p.add_argument("--base", help="base checkpoint (default: the one recorded in manifest.json)")
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="output dtype; auto: the base checkpoint's",
    )
    p.add_argument("--eval-data", help="conversations for the Q-LoRA perplexity comparison (default: the run's)")
    p.add_argument(
        "--allow-pickle-weights",
        action="store_true",
        help="load .bin (torch pickle) weights when there are no safetensors (unpickling can run code)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a model already in --out (never the adapter or its base)"
    )
    p.add_argument(
        "--for",
        dest="servers",
        action="append",
        choices=tuple(SERVERS),
        help="a server the merged model is for (repeatable; default: all): SERVING.md gives its command",
    )


def run(args: argparse.Namespace) -> int:
    """Merge and report."""
    from qwen_ft.cli.args import hide_unused_stacks
    from qwen_ft.deps import stacks_of_checkpoint
    from qwen_ft.export.merge import merge_adapter

    hide_unused_stacks(
        args, stacks_of_checkpoint(args.adapter) | (stacks_of_checkpoint(args.base) if args.base else set())
    )
    r = merge_adapter(
        args.adapter,
        args.out,
        args.base,
        args.dtype,
        args.eval_data,
        args.overwrite,
        args.allow_pickle_weights,
        args.servers,
    )
    print(f"merged into {r.merged_into}")
    print(
        f"merge check: max |logit diff| merged vs base+adapter = {r.merge_diff:.3g} (fp32)"
        + (f", {r.cast_diff:.3g} after casting to {r.dtype}" if r.dtype != "fp32" else "")
        + f"; tolerance {r.tolerance:.3g}"
    )
    if r.quantized_diff is not None and r.perplexity is not None:  # both set for a Q-LoRA adapter
        ppl = r.perplexity
        print(
            f"vs adapter on the quantized base it was trained on: max |logit diff| {r.quantized_diff:.3g}; "
            f"perplexity merged {ppl['merged']:.3f}, adapter on quantized base "
            f"{ppl['adapter on quantized base']:.3f} (on {ppl['on']})"
        )
    print(f"wrote merged {r.dtype} model to {r.out_dir}")
    return 0
