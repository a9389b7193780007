"""Argument parsing shared by `qwen-ft` and finetune.py: overrides anywhere, defaults in --help."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps each command's docstring as written and shows every option's default (flags and
    options without one say nothing: "(default: None)" tells a user nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


def hide_unused_stacks(args: argparse.Namespace, used: set[str]) -> None:
    """Hide the optional stacks a command will not use (`deps.hide_unused`), but only where the command
    owns its process (the console script, `python -m`, finetune.py): a caller of `main([...])` shares
    its interpreter and may use those stacks afterwards."""
    if getattr(args, "own_process", False):
        from qwen_ft.deps import hide_unused

        hide_unused(used)


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args that also accepts `key=value` overrides after or between options."""
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if "=" not in r or r.startswith("-")]
    if stray or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args
