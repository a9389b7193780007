"""The story of a run: config -> checks -> tokenizer -> data -> model -> train -> save.

`finetune` is what `qwen_ft.finetune`, `qwen-ft train` and `torchrun finetune.py` all run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_ft.config.schema import RunConfig, TrainConfig
from qwen_ft.recipe import steps
from qwen_ft.train.distributed import DistInfo

if TYPE_CHECKING:
    from qwen_ft.train.checkpoint import TrainState
    from qwen_ft.train.loop import TrainingRun


@dataclass(frozen=True)
class RunResult:
    """What a finished fine-tuning produced."""

    output_dir: Path
    steps: int
    first_loss: float
    last_loss: float
    eval_loss: float | None
    model_path: Path  # the final weights (an adapter directory for LoRA/Q-LoRA): output_dir itself


def build_run(cfg: RunConfig, dist: DistInfo) -> tuple[TrainingRun, TrainState]:
    """Everything a run needs, built in order: returns (the TrainingRun, its TrainState: fresh or resumed)."""
    from qwen_ft.train import loop

    cfg = steps.native_checkpoint(cfg, dist)
    ckpt = steps.resume_checkpoint(cfg, dist)
    precision, attn, family = steps.runtime(cfg, dist)
    cfg = steps.checkpointing_for_budget(cfg, precision, dist)
    ds_config, _zero3_loading = steps.deepspeed(cfg, precision, dist)  # kept alive while the model loads
    tok, data, first_epoch = steps.tokenizer_and_data(cfg, dist, family)
    unwrapped = steps.model(cfg, family, precision, attn, dist)
    host_embedding = steps.host_embedding(cfg, unwrapped, dist)
    table = steps.reference_table(cfg, data, precision, attn, dist)  # preference.precompute_ref's
    reference = steps.reference_model(cfg, family, precision, attn, dist, table)  # full fine-tuning's
    plan = steps.run_plan(cfg, dist, first_epoch, precision, attn, family)
    backend = steps.backend(cfg, unwrapped, precision, dist, ds_config)
    state = steps.resume_state(cfg, backend, data, dist, ckpt)
    tr = loop.TrainingRun(
        cfg.train,
        cfg.data,
        plan,
        dist,
        backend,
        unwrapped,
        data,
        tok.endoftext_id,
        steps.saver(cfg, unwrapped, tok, family, backend, dist),
        steps.loss_function(cfg.train, unwrapped, ds_config, cfg.objective, cfg.preference, reference),
        steps.router_loss(cfg.train, unwrapped, family, dist),
        host_embedding=host_embedding,
    )
    # from_pretrained returns eval mode, where transformers skips gradient checkpointing and dropout:
    # whatever runs a step next (the loop, scripts/profile_step.py) must run the training step.
    backend.module.train()
    if table is not None:
        steps.precompute_reference(tr, table)
    return tr, state


def run_training(cfg: RunConfig, dist: DistInfo) -> tuple[TrainingRun, TrainState]:
    """Build everything for `cfg` and train; returns (the TrainingRun, its final TrainState)."""
    from qwen_ft.errors import Preempted
    from qwen_ft.train import loop
    from qwen_ft.train.distributed import print0
    from qwen_ft.train.logging import RunLogger
    from qwen_ft.train.peers import lost_rank_error
    from qwen_ft.train.preempt import StopRequests

    lock = steps.lock_output_dir(cfg.train, dist)
    try:
        tr, state = build_run(cfg, dist)
        c = tr.train
        logger = RunLogger(c.output_dir, tr.plan.total_steps, state.step, dist.is_main, c.logging_steps)
        try:
            with StopRequests() as stop:  # SIGTERM, SIGUSR1, SIGINT: stop after the step with a checkpoint
                state = loop.train(tr, state, logger, stop)
        except Preempted:
            logger.close(state.history)  # TensorBoard and the plot hold every step up to the stop
            raise
        steps.save_final(tr, state)
        logger.close(state.history)
    except RuntimeError as e:  # a collective failed: say which rank is gone
        lost = lost_rank_error(e, dist, cfg.train.output_dir, cfg.train.collective_timeout)
        if lost is None:
            raise
        raise lost from None
    finally:
        if lock is not None:
            lock.release()
    print0(dist, steps.summary(cfg.train.output_dir, state))
    return tr, state


def finetune(config: str | Path | RunConfig, overrides: list[str] | tuple[str, ...] = ()) -> RunResult:
    """Run one fine-tuning job end to end (every process of a torchrun job calls this).

    Raises:
        ConfigError: every problem with the config and this machine, before any work.
        QwenFtError: other user errors, with the fix.
    """
    from qwen_ft.train.distributed import shutdown

    cfg = steps.checked_config(config, list(overrides))
    dist = steps.distributed(cfg.train)
    try:
        _, state = run_training(cfg, dist)
    finally:
        shutdown(dist)
    return result_of(cfg.train, state)


def result_of(train: TrainConfig, state: TrainState) -> RunResult:
    """The RunResult of a finished TrainState."""
    losses = [h["loss"] for h in state.history if "loss" in h]
    evals = [h["eval_loss"] for h in state.history if "eval_loss" in h]
    out = Path(train.output_dir)
    return RunResult(out, state.step, losses[0], losses[-1], evals[-1] if evals else None, out)
