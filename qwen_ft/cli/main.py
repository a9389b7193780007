"""`qwen-ft` console script: subcommands for validating configs, preprocessing data and more.

Run: qwen-ft --help
"""

from __future__ import annotations

import argparse
import sys

from qwen_ft.cli.args import HelpFormatter, parse_with_overrides
from qwen_ft.errors import QwenFtError
from qwen_ft.quiet import quiet_third_party
from qwen_ft.version import __version__

COMMANDS = (
    "train",
    "merge",
    "chat",
    "quantize",
    "export",
    "convert",
    "estimate",
    "bench",
    "validate",
    "preprocess",
    "inspect",
    "make_tiny_model",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command module (imported lazily, all light)."""
    import importlib

    parser = argparse.ArgumentParser(prog="qwen-ft", description="Fine-tune Qwen models from one YAML config.")
    parser.add_argument("--version", action="version", version=f"qwen-ft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"qwen_ft.cli.{name}")
        p = sub.add_parser(
            name.replace("_", "-"), help=module.HELP, description=module.__doc__, formatter_class=HelpFormatter
        )
        module.add_arguments(p)
        p.add_argument(
            "-v", "--verbose", action="store_true", help="also show third-party warnings, banners and progress bars"
        )
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the command; user errors print a message and return 1."""
    args = parse_with_overrides(build_parser(), argv)
    args.own_process = argv is None  # the command line itself, not a caller's main([...])
    quiet_third_party(verbose=args.verbose)
    try:
        return int(args.run(args) or 0)
    except QwenFtError as e:
        print(f"{e.prefix}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
