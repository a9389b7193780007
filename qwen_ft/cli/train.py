"""The story of a run: config -> validate -> dependencies -> tokenizer -> data -> (model -> train -> save).

Run: python finetune.py --config configs/tiny_cpu_smoke.yaml [key=value ...]

This version prepares the data (validated, tokenized, cached, packed) and stops before the
model stage: the training loop is not part of this release yet, and the command says so and
exits with status 2 rather than pretending to train.
"""

from __future__ import annotations

import argparse
import sys

from qwen_ft.errors import QwenFtError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """--config CONFIG [key=value ...]."""
    p = argparse.ArgumentParser(prog="finetune.py", description="Fine-tune a Qwen model from one YAML config.")
    p.add_argument("--config", required=True, help="run YAML")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    from qwen_ft.cli.main import parse_with_overrides

    return parse_with_overrides(p, argv)


def run(args: argparse.Namespace) -> int:
    """Load and check everything up to the model stage."""
    from qwen_ft.config.load import load_config
    from qwen_ft.config.validate import check_environment
    from qwen_ft.data.prepare import format_stats, plan_for, prepare_data
    from qwen_ft.errors import ConfigError
    from qwen_ft.tokenizer import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    problems = check_environment(cfg)
    if problems:
        raise ConfigError(problems, source=args.config)
    tok = load_tokenizer(cfg.tokenizer_path)
    data = prepare_data(cfg, tok)
    print(format_stats(data.stats, plan_for(cfg, data), cfg))
    print("data prepared; the training stage is not available in this version of qwen-ft", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry for finetune.py; user errors print a message and return 1."""
    try:
        return run(parse_args(argv))
    except QwenFtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
