"""model.compile: each decoder layer compiled (inside its checkpoint wrapper) trains exactly as eager."""

from __future__ import annotations

import pytest

from qwen_ft.config.load import config_from_dict
from qwen_ft.errors import ConfigError
from qwen_ft.recipe import steps
from qwen_ft.recipe.run import run_training


def losses(config: str, *overrides: str) -> tuple[list[float], int]:
    """Losses of a run and how many of its modules run compiled."""
    trainer, state = run_training(steps.checked_config(config, list(overrides)), steps.distributed())
    compiled = sum(getattr(m, "_compiled_call_impl", None) is not None for m in trainer.unwrapped.modules())
    return [h["loss"] for h in state.history if "loss" in h], compiled


def test_compiled_layers_train_like_eager(run_config):
    import torch

    config = run_config(train={"max_steps": 4, "overwrite_output_dir": True}, lora={"dropout": 0.0})
    eager, none = losses(config)
    torch._dynamo.reset()
    compiled, layers = losses(config, "model.compile=true")
    assert none == 0 and layers == 1  # the tiny model's one decoder layer
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert len(set(eager)) > 1  # micro-batches of different lengths went through one dynamic-shape graph


@pytest.mark.parametrize("section, value", [("method", "qlora"), ("dist", {"deepspeed": "zero3"})])
def test_compile_refused_where_it_cannot_work(section, value):
    raw = {"model": {"path": "m", "compile": True}, "data": {"train_files": ["d"]}, section: value}
    with pytest.raises(ConfigError, match="model.compile: true"):
        config_from_dict(raw)


def test_compile_refuses_a_model_without_decoder_layers():
    import torch

    from qwen_ft.errors import QwenFtError
    from qwen_ft.model.build import compile_decoder_layers

    with pytest.raises(QwenFtError, match="no transformers decoder layers"):
        compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
