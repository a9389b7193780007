"""Argument helpers shared by subcommands: a config file with overrides, or quick flags."""

from __future__ import annotations

import argparse
import re

from qwen_ft.config.load import config_from_dict, load_config
from qwen_ft.config.schema import RunConfig
from qwen_ft.errors import ConfigError, QwenFtError
from qwen_ft.recipe.preflight import check_environment


def add_data_source_arguments(p: argparse.ArgumentParser) -> None:
    """--config C [key=value ...], or --tokenizer DIR --data FILE ... for use without a config."""
    p.add_argument("--config", help="run YAML")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--tokenizer", help="tokenizer directory (without --config)")
    p.add_argument("--data", nargs="+", help="conversation files (without --config)")
    p.add_argument("--max-length", type=int, help="data.max_length (without --config)")
    p.add_argument("--label-policy", choices=("assistant", "last_turn", "qwen_reference"), help="data.label_policy")
    p.add_argument("--on-error", choices=("error", "skip"), help="data.on_error")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig named by --config, or built from --tokenizer/--data; environment-checked.

    Raises:
        QwenFtError: usage mistakes; ConfigError: every config/environment problem at once.
    """
    _move_overrides_out_of_data(args)
    if args.config:
        extra = [f"{k}={v}" for k, v in _quick_flags(args).items()]
        cfg = load_config(args.config, [*args.overrides, *extra])
        source = args.config
    else:
        if not (args.tokenizer and args.data):
            raise QwenFtError("give --config CONFIG, or both --tokenizer DIR and --data FILE [FILE ...]")
        data = {"train_files": list(args.data), **{k.split(".")[1]: v for k, v in _quick_flags(args).items()}}
        raw = {"model": {"path": args.tokenizer}, "tokenizer": {"path": args.tokenizer}, "data": data}
        cfg = config_from_dict(raw, args.overrides, source="command line")
        source = "command line"
    problems = check_environment(cfg, need_model=False)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


OVERRIDE = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)+=")


def _move_overrides_out_of_data(args: argparse.Namespace) -> None:
    """`--data a.jsonl data.max_length=9`: argparse gives the override to --data; hand it back."""
    if args.data:
        args.overrides = [*args.overrides, *(d for d in args.data if OVERRIDE.match(d))]
        args.data = [d for d in args.data if not OVERRIDE.match(d)]


def _quick_flags(args: argparse.Namespace) -> dict:
    flags = {
        "data.max_length": args.max_length,
        "data.label_policy": args.label_policy,
        "data.on_error": args.on_error,
    }
    return {k: v for k, v in flags.items() if v is not None}
