"""Partial activation checkpointing (model.checkpoint_fraction): which layers, same gradients, memory."""

from __future__ import annotations

import pytest
import torch

from qwen_ft.config.load import config_from_dict
from qwen_ft.errors import ConfigError
from qwen_ft.model.shape import Shape
from qwen_ft.recipe import steps
from qwen_ft.recipe.estimate import peak_of
from qwen_ft.train.distributed import DistInfo
from qwen_ft.train.loss import causal_lm_loss

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    from qwen_ft.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny4", hidden=32, layers=4)


def build(path, method: str, **model):
    cfg = config_from_dict(
        {
            "model": {"path": str(path), "dtype": "fp32", **model},
            "method": method,
            "data": {"train_files": ["unused.jsonl"]},
            "lora": {"r": 4, "dropout": 0.0},
        }
    )
    precision, attn, family = steps.runtime(cfg, CPU)
    return steps.model(cfg, family, precision, attn, CPU)


def flags(model) -> list[bool]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def grads(model) -> tuple[float, dict]:
    torch.manual_seed(0)
    ids = torch.randint(0, 151000, (2, 24))
    model.train()
    loss, _ = causal_lm_loss(model, {"input_ids": ids, "labels": ids.clone()})
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_partial_checkpointing_gives_the_same_gradients(four_layers, method):
    ref_loss, ref = grads(build(four_layers, method, gradient_checkpointing=False))
    cases = ((1.0, [True] * 4), (0.5, [True, True, False, False]), (0.3, [True, False, False, False]))
    for fraction, expected in cases:
        model = build(four_layers, method, checkpoint_fraction=fraction)
        assert flags(model) == expected
        loss, got = grads(model)
        assert loss == pytest.approx(ref_loss, abs=1e-6)
        for name, g in ref.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6)


def test_fraction_validation_and_estimate():
    with pytest.raises(ConfigError, match="checkpoint_fraction: 0.0 must be in .*gradient_checkpointing=false"):
        config_from_dict({"model": {"path": "m", "checkpoint_fraction": 0.0}, "data": {"train_files": ["d"]}})
    shape = Shape(151936, 4096, 32, 32, 32, 11008, False, 128, False)

    def activations(**model):
        cfg = config_from_dict({"model": {"path": "m", **model}, "data": {"train_files": ["d"]}})
        return peak_of(cfg, shape, "bf16", 1, 0, False).parts["activations"]

    assert activations() < activations(checkpoint_fraction=0.5) < activations(gradient_checkpointing=False)
    assert activations(checkpoint_fraction=1.0) == activations()
