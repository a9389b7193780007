"""docs/configuration.md is the schema's own reference: regenerated, it is the same file."""

from __future__ import annotations

import dataclasses

from qwen_ft.config import reference
from qwen_ft.config.schema import RunConfig


def test_the_configuration_reference_is_up_to_date():
    assert reference.DOCS.read_text() == reference.markdown(), (
        "docs/configuration.md is stale: run `python -m qwen_ft.config.reference > docs/configuration.md`"
    )


def test_every_key_is_in_the_reference_with_its_help():
    text = reference.markdown()
    for section in dataclasses.fields(RunConfig):
        cls = section.default.__class__ if dataclasses.is_dataclass(section.default) else None
        for f in dataclasses.fields(cls) if cls else []:
            assert f"| `{section.name}.{f.name}` |" in text
            assert f.metadata["help"].replace("|", "\\|") in text
