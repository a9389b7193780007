"""Learning-rate schedule and run-plan arithmetic."""

from __future__ import annotations

import math

import pytest

from qwen_ft.config.load import config_from_dict
from qwen_ft.errors import QwenFtError
from qwen_ft.model.load import Precision
from qwen_ft.train.plan import make_run_plan, rank_batches
from qwen_ft.train.schedule import lr_at


def test_cosine_with_warmup_at_chosen_steps():
    peak, total, warmup = 1e-3, 100, 10
    assert lr_at(0, peak, total, warmup, "cosine") == pytest.approx(1e-4)
    assert lr_at(9, peak, total, warmup, "cosine") == pytest.approx(1e-3)
    assert lr_at(10, peak, total, warmup, "cosine") == pytest.approx(1e-3)
    assert lr_at(55, peak, total, warmup, "cosine") == pytest.approx(5e-4)
    assert lr_at(99, peak, total, warmup, "cosine") == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_linear_and_constant():
    assert lr_at(55, 1.0, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_at(5, 1.0, 100, 10, "constant") == pytest.approx(0.6)
    assert lr_at(80, 1.0, 100, 10, "constant") == 1.0
    assert lr_at(0, 1.0, 10, 0, "cosine") == 1.0


def test_run_plan_counts():
    import torch

    cfg = config_from_dict(
        {
            "model": {"path": "m"},
            "data": {"train_files": ["d"]},
            "train": {"grad_accum": 4, "epochs": 2, "warmup_ratio": 0.1},
        }
    )
    plan = make_run_plan(cfg.train, torch.device("cpu"), Precision("fp32", torch.float32), "sdpa", 2, 21)
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (10, 3, 6, 1)
    with pytest.raises(QwenFtError, match="1 micro-batch"):
        make_run_plan(cfg.train, torch.device("cpu"), Precision("fp32", torch.float32), "sdpa", 2, 1)


def test_rank_batches_are_disjoint_and_equal():
    batches = list(range(11))
    shares = [rank_batches(batches, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    assert sorted(sum(shares, [])) == list(range(9))


def test_eval_share_is_even_and_counts_each_batch_once():
    from qwen_ft.train.loop import eval_share

    batches = [[i] for i in range(5)]
    shares = [eval_share(batches, rank, 2) for rank in range(2)]
    assert [len(s) for s in shares] == [3, 3]  # ZeRO-3: every rank takes part in every forward
    counted = sorted(rows[0] for s in shares for rows, c in s if c)
    assert counted == [0, 1, 2, 3, 4]
    assert eval_share([], 0, 2) == [] and len(eval_share(batches, 3, 4)) == 2
