"""DeepSpeed JSON built from the run config (presets, user JSON, owned values, refusals): pure
functions of the config, so they run without DeepSpeed installed. Training under ZeRO:
tests/integration/test_deepspeed.py (needs the extras)."""

from __future__ import annotations

import json

import pytest

from qwen_ft.config.load import config_from_dict
from qwen_ft.errors import ConfigError
from qwen_ft.recipe.preflight import check_environment
from qwen_ft.train.ds_config import deepspeed_config, preset, read_base
from tests.conftest import REPO


def test_user_json_conflicts_and_schedulers_are_refused(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": "auto",
                "scheduler": {"type": "WarmupLR"},
                "zero_optimization": {"stage": 2},
            }
        )
    )
    cfg = config_from_dict(
        {
            "model": {"path": "m"},
            "data": {"train_files": ["d"]},
            "dist": {"deepspeed": str(user)},
            "train": {"micro_batch_size": 2},
        }
    )
    with pytest.raises(ConfigError) as e:
        deepspeed_config(cfg.dist, cfg.train, "fp32", 2)
    text = str(e.value)
    assert "remove the 'scheduler' block" in text and "train_micro_batch_size_per_gpu is 4" in text
    cfg = config_from_dict(
        {
            "model": {"path": "m"},
            "data": {"train_files": ["d"]},
            "dist": {"deepspeed": "zero3"},
            "train": {"micro_batch_size": 2, "grad_accum": 3, "max_grad_norm": 0.5},
        }
    )
    filled = deepspeed_config(cfg.dist, cfg.train, "bf16", 4)
    assert (filled["train_batch_size"], filled["gradient_clipping"], filled["bf16"]["enabled"]) == (24, 0.5, True)
    assert filled["zero_optimization"]["stage"] == 3 and "scheduler" not in filled


def test_gptq_base_under_zero3_is_refused(tmp_path):
    raw = {"model": {"path": "m"}, "data": {"train_files": ["d"]}, "method": "qlora", "quant": {"backend": "gptq"}}
    with pytest.raises(ConfigError, match="use dist.deepspeed=zero2"):  # a preset: refused at validation
        config_from_dict({**raw, "dist": {"deepspeed": "zero3"}})
    user = tmp_path / "stage3.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = config_from_dict({**raw, "dist": {"deepspeed": str(user)}})  # a user JSON: refused once read
    assert [p for p in check_environment(cfg, need_model=False) if "ZeRO-3 with quant.backend=gptq" in p] == [
        f"dist.deepspeed={user} is ZeRO-3 with quant.backend=gptq: ZeRO-3 cannot partition GPTQ's packed weights; "
        "use dist.deepspeed=zero2 (or a stage-2 JSON)"
    ]
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert not [p for p in check_environment(cfg, need_model=False) if "ZeRO-3" in p]


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero2_offload", "zero3_offload"])
def test_shipped_json_equals_the_built_in_preset(name):
    """configs/deepspeed/*.json are the copies to edit; the presets themselves are built in (wheel installs)."""
    assert json.loads((REPO / f"configs/deepspeed/{name}.json").read_text()) == preset(name)
    assert read_base(name) == (preset(name), f"built-in preset {name}")


def test_missing_user_json_names_the_presets(tmp_path):
    with pytest.raises(ConfigError, match="not found; use a preset \\(zero2, zero3"):
        read_base(str(tmp_path / "missing.json"))
