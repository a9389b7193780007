"""What the preference objectives refuse in a config, each problem named with its fix, all at once."""

from __future__ import annotations

import pytest

from qwen_ft.config.schema import DataConfig, DistConfig, ModelConfig, PreferenceSettings, RunConfig, TrainConfig
from qwen_ft.config.validate import validate_config


def problems(**fields) -> list[str]:
    base = {"model": ModelConfig(path="m"), "data": DataConfig(train_files=("d.jsonl",))}
    return validate_config(RunConfig(**{**base, **fields}))


@pytest.mark.parametrize("objective", ["dpo", "kto", "simpo", "orpo", "sft"])
def test_every_objective_trains_full_models_and_adapters(objective):
    assert problems(objective=objective, method="full") == problems(objective=objective, method="qlora") == []


def test_settings_out_of_range_are_listed_together():
    settings = PreferenceSettings(beta=0.0, label_smoothing=0.5, desirable_weight=-1.0, cpo_alpha=float("nan"))
    found = problems(objective="dpo", preference=settings, dist=DistConfig(deepspeed="zero2"))
    assert [p.split(":")[0] for p in found] == [
        "preference.cpo_alpha",
        "preference.beta",
        "preference.label_smoothing",
        "preference.desirable_weight",
        "objective",
    ]
    assert "preference tuning runs on one process or under DDP" in found[-1]


def test_kto_needs_other_examples_in_a_micro_batch_for_its_kl_estimate():
    alone = TrainConfig(micro_batch_size=1)
    (found,) = problems(objective="kto", train=alone, data=DataConfig(train_files=("d.jsonl",), packing=False))
    assert "set micro_batch_size >= 2 or data.packing: true" in found
    assert problems(objective="kto", train=alone) == []  # packed rows hold several examples


def test_an_adapter_with_full_fine_tuning_is_a_config_error():
    (found,) = problems(model=ModelConfig(path="m", adapter="a"), method="full")
    assert found.startswith("model.adapter with method: full")
