"""Fine-tune a model from one YAML config (the same run as `torchrun finetune.py --config CONFIG`).

Run: torchrun --nproc_per_node N finetune.py --config configs/X.yaml [key=value ...]
     python finetune.py --config configs/tiny_cpu_smoke.yaml
     qwen-ft train configs/tiny_cpu_smoke.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from qwen_ft.errors import QwenFtError

HELP = "fine-tune a model (same as: torchrun finetune.py --config CONFIG)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CONFIG [key=value ...]."""
    p.add_argument("config", help="run YAML")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.max_steps=10")


def run(args: argparse.Namespace) -> int:
    """`qwen-ft train` entry."""
    from qwen_ft.api import load_config
    from qwen_ft.cli.args import hide_unused_stacks
    from qwen_ft.recipe.preflight import required_extras
    from qwen_ft.recipe.run import finetune

    hide_unused_stacks(args, {name for name, _ in required_extras(load_config(args.config, args.overrides))})
    finetune(args.config, args.overrides)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry for finetune.py; user errors print a message and return 1."""
    from qwen_ft.cli.args import HelpFormatter, parse_with_overrides
    from qwen_ft.quiet import quiet_third_party

    p = argparse.ArgumentParser(
        prog="finetune.py", description="Fine-tune a Qwen model from one YAML config.", formatter_class=HelpFormatter
    )
    p.add_argument("--config", required=True, help="run YAML")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.max_steps=10")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also show third-party warnings, banners and progress bars"
    )
    args = parse_with_overrides(p, argv)
    args.own_process = argv is None
    quiet_third_party(verbose=args.verbose)
    try:
        return run(args)
    except QwenFtError as e:
        print(f"{e.prefix}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
