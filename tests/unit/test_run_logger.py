"""train.logging_steps: TensorBoard gets the mean over each window of N steps, and the last step."""

from __future__ import annotations

import pytest

from qwen_ft.train.logging import RunLogger, window_mean


def scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)]


def test_window_mean_averages_loss_and_speed_keeps_last_lr():
    got = window_mean(
        [
            {"step": 1, "loss": 2.0, "lr": 1.0, "grad_norm": 5.0, "tokens_per_s": 10.0},
            {"step": 2, "loss": 4.0, "lr": 0.5, "grad_norm": 7.0, "tokens_per_s": 30.0},
        ]
    )
    assert got == {"step": 2, "loss": 3.0, "lr": 0.5, "grad_norm": 7.0, "tokens_per_s": 20.0}


@pytest.mark.parametrize(
    "every, expected", [(3, [(3, 2.0), (6, 5.0), (7, 7.0)]), (1, [(i, float(i)) for i in range(1, 8)])]
)
def test_logging_steps_sets_what_tensorboard_gets(tmp_path, every, expected):
    logger = RunLogger(tmp_path, total_steps=7, start_step=0, enabled=True, every=every)
    for step in range(1, 8):
        logger.step(step, {"step": step, "loss": float(step), "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 1.0})
    logger.close([{"step": s, "loss": float(s)} for s in range(1, 8)])
    assert scalars(tmp_path / "tensorboard", "train/loss") == expected
