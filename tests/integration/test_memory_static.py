"""The estimator's static parts (weights, fp32 trained copies, gradients, AdamW state) against the bytes
of a model built by the training code (CPU, bf16 base): these must be exact; only activations and
logits are first-order."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_ft.config.load import config_from_dict
from qwen_ft.model.shape import Shape
from qwen_ft.recipe import steps
from qwen_ft.recipe.estimate import peak_of
from qwen_ft.train.distributed import DistInfo
from qwen_ft.train.schedule import build_optimizer

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    from qwen_ft.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("m") / "qwen2", family="qwen2", hidden=64, layers=2)


@pytest.mark.parametrize("emb", [False, True], ids=["lora", "lora_emb"])
def test_static_memory_is_exact(qwen2_dir, emb):
    cfg = config_from_dict(
        {
            "model": {"path": str(qwen2_dir), "dtype": "bf16"},
            "data": {"train_files": ["unused.jsonl"], "max_length": 64},
            "lora": {"r": 8, "train_embeddings": emb},
            "train": {"micro_batch_size": 1},
        }
    )
    precision, attn, family = steps.runtime(cfg, CPU)
    model = steps.model(cfg, family, precision, attn, CPU)
    predicted = peak_of(
        cfg, Shape.from_config(json.loads((qwen2_dir / "config.json").read_text())), "bf16", 1, 0, False
    ).parts
    assert unique_bytes(model.parameters()) == predicted["weights"] + predicted["trained fp32"]
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.ones_like(p)
    assert unique_bytes(p.grad for p in trained) == predicted["gradients"]
    optimizer = build_optimizer(model, cfg.train)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert unique_bytes(state) == predicted["optimizer"]
