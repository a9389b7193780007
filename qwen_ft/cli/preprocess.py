"""Tokenize conversation data (cached) and print what happened to every row.

Run: qwen-ft preprocess --config configs/tiny_cpu_smoke.yaml
     qwen-ft preprocess --tokenizer DIR --data FILE [--max-length N] [--dump OUT.jsonl]

`--dump` writes one JSON object per input conversation, in input order and before packing:
{"input_ids": [...], "labels": [...]} with -100 for masked labels (a stable interface). A
conversation dropped by the length policy is written as empty lists with "dropped": true.
"""

from __future__ import annotations

import argparse
import json

from qwen_ft.cli.common import add_data_source_arguments, config_from_args

HELP = "tokenize data with label masks and print stats (conversations, tokens, packing)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Data source arguments plus --dump."""
    add_data_source_arguments(p)
    p.add_argument("--dump", metavar="OUT.jsonl", help="write input_ids/labels per conversation")


def run(args: argparse.Namespace) -> int:
    """Tokenize, plan batches, print stats, optionally dump."""
    from qwen_ft.data.prepare import format_stats, plan_for, prepare_data
    from qwen_ft.data.tokenize import load_shards
    from qwen_ft.recipe.steps import template_source
    from qwen_ft.tokenizer import load_tokenizer

    cfg = config_from_args(args)
    tok = load_tokenizer(cfg.tokenizer_path)
    data = prepare_data(cfg.data, tok, cfg.train.seed, cfg.objective)
    s = data.stats
    print(
        f"data: {', '.join(cfg.data.train_files)} (cache {s.cache}: {s.cache_path}), rendered by "
        f"{template_source(cfg.data, tok)}"
    )
    print(format_stats(s, plan_for(cfg.data, cfg.train, data), cfg.data, cfg.train.micro_batch_size))
    if args.dump:
        n = dump(load_shards(s.cache_path, s.shards), args.dump)
        print(f"wrote {n:,} conversations to {args.dump}")
    return 0


def dump(full, out_path: str) -> int:
    """Write every tokenized conversation (dropped ones included), in input order."""
    n = 0
    with open(out_path, "w", encoding="utf-8") as fh:
        for batch in full.iter(batch_size=1000):
            for ids, labels, status in zip(batch["input_ids"], batch["labels"], batch["status"], strict=True):
                if status == "error":  # a skipped row (data.on_error=skip), counted in the report
                    continue
                row = {"input_ids": ids, "labels": labels}
                if status == "dropped":
                    row["dropped"] = True
                fh.write(json.dumps(row) + "\n")
                n += 1
    return n
