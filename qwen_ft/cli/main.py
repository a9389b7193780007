"""`qwen-ft` console script: subcommands for validating configs, preprocessing data and more.

Run: qwen-ft --help
"""

from __future__ import annotations

import argparse
import sys

from qwen_ft import __version__
from qwen_ft.errors import QwenFtError

COMMANDS = ("train", "merge", "chat", "quantize", "convert", "estimate", "bench", "validate", "preprocess", "inspect",
            "make_tiny_model")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command module (imported lazily, all light)."""
    import importlib

    parser = argparse.ArgumentParser(prog="qwen-ft", description="Fine-tune Qwen models from one YAML config.")
    parser.add_argument("--version", action="version", version=f"qwen-ft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"qwen_ft.cli.{name}")
        p = sub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args that also accepts `key=value` overrides after or between options."""
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if "=" not in r or r.startswith("-")]
    if stray or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def quiet_third_party_logs() -> None:
    """torchao (pulled in with the GPTQ extra) logs deprecation notices through torch's pytree logger
    at import; they say nothing to a user of qwen-ft."""
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the command; user errors print a message and return 1."""
    quiet_third_party_logs()
    args = parse_with_overrides(build_parser(), argv)
    try:
        return int(args.run(args) or 0)
    except QwenFtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
