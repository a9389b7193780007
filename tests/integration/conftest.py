"""Tiny checkpoints and run configs for training tests (real vocabulary, hidden 32, one layer)."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from qwen_ft.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden=32, layers=1)


def write_run_yaml(path, model_dir, workdir, **sections) -> str:
    """A run YAML for `model_dir` on the bundled data (fp32, SDPA, 128 tokens, cache under `workdir`);
    each keyword merges into its section (or replaces a scalar such as method)."""
    raw = {
        "model": {"path": str(model_dir), "dtype": "fp32", "attn_implementation": "sdpa"},
        "data": {"train_files": [str(REPO / "data/example_chatml.jsonl")], "max_length": 128,
                 "cache_dir": str(workdir / "cache")},
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
        "train": {"output_dir": str(tmp_path / "out"), "micro_batch_size": 2, "grad_accum": 2,
                  "learning_rate": 5e-3, "max_steps": 6, "warmup_ratio": 0.2, "seed": 3},
    }

    def make(**sections) -> str:
        merged = {k: {**defaults.get(k, {}), **v} if isinstance(v, dict) else v for k, v in sections.items()}
        return write_run_yaml(tmp_path / "run.yaml", tiny_model_dir, tmp_path, **{**defaults, **merged})

    return make
