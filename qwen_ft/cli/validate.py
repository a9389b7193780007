"""Validate a run config: print the resolved YAML (exit 0) or every problem at once (exit 1).

Run: qwen-ft validate configs/tiny_cpu_smoke.yaml train.learning_rate=2e-4
"""

from __future__ import annotations

import argparse

from qwen_ft.config.load import dump_config, load_config
from qwen_ft.errors import ConfigError
from qwen_ft.recipe.preflight import run_problems

HELP = "check a config (and overrides); print the resolved config or all errors"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CONFIG [key=value ...] [--no-env]."""
    p.add_argument("config", help="run YAML")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--no-env", action="store_true", help="skip checks of paths and installed packages")


def run(args: argparse.Namespace) -> int:
    """Validate; ConfigError propagates to the CLI's error handler (exit 1)."""
    cfg = load_config(args.config, args.overrides)
    if not args.no_env:
        problems = run_problems(cfg)
        if problems:
            raise ConfigError(problems, source=args.config)
    print(dump_config(cfg), end="")
    return 0
