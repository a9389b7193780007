"""The configuration reference (docs/configuration.md), generated from the schema: every key, its type,
default and help string, section by section. Regenerate with `python -m qwen_ft.config.reference`;
tests/unit/test_config_reference.py fails when the file is stale."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from qwen_ft.config.schema import RunConfig

HEADER = """# Configuration reference

Generated from `qwen_ft/config/schema.py` by `python -m qwen_ft.config.reference > docs/configuration.md`;
do not edit by hand. A run is one YAML file with these sections; any key can be overridden on the
command line as `section.key=value` (`train.learning_rate=2e-4`). Unknown keys are errors with a
did-you-mean, and every problem is reported at once.
"""


def _type(hint) -> str:
    """A field's type in words: `one of a, b` for a Literal, else the type's own name."""
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(f"`{v}`" for v in typing.get_args(hint))
    text = str(hint) if typing.get_args(hint) else getattr(hint, "__name__", str(hint))
    return f"`{text.replace('typing.', '')}`"


def _default(value) -> str:
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    if isinstance(value, bool) or value is None:
        return f"`{str(value).lower() if value is not None else 'null'}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section(name: str, cls) -> list[str]:
    hints = typing.get_type_hints(cls, include_extras=False)
    lines = [
        f"## `{name}`",
        "",
        _cell((cls.__doc__ or "").strip()),
        "",
        "| key | type | default | what it does |",
        "|---|---|---|---|",
    ]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        lines.append(
            f"| `{name}.{f.name}` | {_cell(_type(hints[f.name]))} | {_cell(_default(default))} | "
            f"{_cell(f.metadata.get('help', ''))} |"
        )
    return [*lines, ""]


def markdown() -> str:
    """The whole reference, as docs/configuration.md holds it."""
    hints = typing.get_type_hints(RunConfig)
    lines = [HEADER]
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += _section(f.name, hints[f.name])
        else:
            lines += [
                f"## `{f.name}`",
                "",
                f"{_type(hints[f.name])}, default {_default(f.default)}: {_cell(f.metadata.get('help', ''))}",
                "",
            ]
    return "\n".join(lines)


DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

if __name__ == "__main__":
    print(markdown(), end="")
