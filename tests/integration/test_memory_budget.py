"""model.memory_budget_gib: as few layers recomputed as the estimate allows within the budget (lever 4 of issue
34: memory spent on speed), the same training as with every layer recomputed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from qwen_ft.errors import QwenFtError


def test_the_fewest_recomputed_layers_that_fit_are_chosen(tmp_path):
    from qwen_ft.bench.shapes import shape_config
    from qwen_ft.config.load import config_from_dict
    from qwen_ft.recipe.estimate import estimate_run, layers_for_budget

    (tmp_path / "config.json").write_text(json.dumps(shape_config("7b")))
    cfg = config_from_dict(
        {
            "model": {"path": str(tmp_path), "dtype": "bf16"},
            "data": {"train_files": ["unused.jsonl"], "max_length": 2048},
            "lora": {"r": 64, "alpha": 16},
            "train": {"micro_batch_size": 2},
        }
    )

    def peak(k: int) -> float:
        model = dataclasses.replace(cfg.model, gradient_checkpointing=k > 0, checkpoint_fraction=k / 32 or 1.0)
        return estimate_run(dataclasses.replace(cfg, model=model)).estimate.total / 2**30

    k, layers, chosen = layers_for_budget(cfg, 22.0)
    assert layers == 32 and 0 < k < 32 and chosen == peak(k) <= 22.0 < peak(k - 1)
    assert layers_for_budget(cfg, 1000.0)[0] == 0  # room for every layer's activations: nothing recomputed
    with pytest.raises(QwenFtError, match="even recomputing every one of the 32 layers"):
        layers_for_budget(cfg, 19.0)  # 19.69 GiB with every layer recomputed


def test_a_run_with_a_budget_trains_as_one_recomputing_every_layer(run_config, tmp_path, capsys):
    from qwen_ft.cli.main import main

    runs = {}
    for name, extra in (("budget", ["model.memory_budget_gib=100"]), ("all", [])):
        out = tmp_path / name
        assert main(["train", run_config(train={"max_steps": 3}), *extra, f"train.output_dir={out}"]) == 0
        runs[name] = [h["loss"] for h in json.loads((out / "train_history.json").read_text())]
    assert "memory budget 100 GiB: recomputing 0 of 1 decoder layers" in capsys.readouterr().out
    assert runs["budget"] == runs["all"]
