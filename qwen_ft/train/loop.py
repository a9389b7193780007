"""The training loop: gradient accumulation, AdamW + schedule, eval, checkpoints, non-finite guard."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_ft.data.collate import collate
from qwen_ft.data.packing import plan_batches
from qwen_ft.errors import QwenFtError
from qwen_ft.train import checkpoint as ck
from qwen_ft.train.distributed import DistInfo, all_reduce_sum
from qwen_ft.train.loss import causal_lm_loss
from qwen_ft.train.plan import RunPlan, rank_batches
from qwen_ft.train.schedule import lr_at, set_lr


@dataclass
class Trainer:
    """Everything the loop needs, built elsewhere (this class loads nothing)."""

    cfg: object
    plan: RunPlan
    dist: DistInfo
    model: torch.nn.Module  # what forward/backward run through (DDP-wrapped on several processes)
    unwrapped: torch.nn.Module  # what is saved
    optimizer: torch.optim.Optimizer
    data: object  # PreparedData
    pad_id: int
    save_fn: object  # callable(dir: Path) writing weights + description

    def epoch_batches(self, epoch: int) -> list:
        """This rank's micro-batches of `epoch` (a fresh, seeded plan per epoch)."""
        c = self.cfg
        full = plan_batches(self.data.lengths("train"), c.data.max_length, c.train.micro_batch_size,
                            c.data.packing, c.train.seed, epoch)
        return rank_batches(full.batches, self.dist.rank, self.dist.world)

    def tensors(self, rows: list[list[int]], split: str = "train") -> dict[str, torch.Tensor]:
        """Collate one planned micro-batch onto the device."""
        ds = getattr(self.data, split)
        flat = sorted({i for row in rows for i in row})
        got = ds[flat]
        lookup = {i: {"input_ids": a, "labels": b} for i, a, b in zip(flat, got["input_ids"], got["labels"],
                                                                          strict=True)}
        batch = collate([[lookup[i] for i in row] for row in rows], self.pad_id, self.cfg.data.packing)
        return {k: v.to(self.plan.device) for k, v in batch.items()}

    def autocast(self):
        """bf16/fp16 autocast on GPU; nothing in fp32."""
        p = self.plan.precision
        if p.name == "fp32":
            return nullcontext()
        return torch.autocast(self.plan.device.type, dtype=p.dtype)


def next_group(tr: Trainer, state: ck.TrainState, cache: dict) -> list:
    """The micro-batches of the next optimizer step; advances state.epoch/batch_offset."""
    if cache.get("epoch") != state.epoch:
        cache.update(epoch=state.epoch, batches=tr.epoch_batches(state.epoch))
    batches = cache["batches"]
    group = batches[state.batch_offset:state.batch_offset + tr.cfg.train.grad_accum]
    state.batch_offset += len(group)
    if state.batch_offset >= len(batches):
        state.epoch, state.batch_offset = state.epoch + 1, 0
    return group


def train_step(tr: Trainer, group: list, scaler) -> tuple[float, float, int, int]:
    """Forward/backward over one accumulation group and the optimizer step.

    The loss is the sum of token losses divided by the number of learned tokens in the whole
    group (over all processes), so every token weighs the same whatever the padding/packing.

    Returns:
        (loss, grad norm, learned tokens, input tokens) of the group.
    """
    batches = [tr.tensors(rows) for rows in group]
    local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    n_tokens = max(1.0, all_reduce_sum([float(local)], tr.dist)[0])
    total = 0.0
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1 or not hasattr(tr.model, "no_sync")
        with (nullcontext() if sync else tr.model.no_sync()), tr.autocast():
            loss_sum, _ = causal_lm_loss(tr.model, batch)
            loss = loss_sum * tr.dist.world / n_tokens  # DDP averages gradients over processes
        scaler.scale(loss).backward()
        total += loss_sum.item()
    loss_value = all_reduce_sum([total], tr.dist)[0] / n_tokens
    scaler.unscale_(tr.optimizer)
    params = [p for p in tr.unwrapped.parameters() if p.requires_grad]
    max_norm = tr.cfg.train.max_grad_norm or float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return loss_value, grad_norm, int(n_tokens), sum(int(b["input_ids"].numel()) for b in batches)


def evaluate(tr: Trainer) -> float:
    """Mean token loss over the whole eval set, each batch counted once across processes."""
    c = tr.cfg
    full = plan_batches(tr.data.lengths("eval"), c.data.max_length, c.train.micro_batch_size, c.data.packing,
                        c.train.seed, 0)
    # A strided split: every eval batch is evaluated by exactly one rank. The unwrapped model runs
    # it, since evaluation needs no gradient synchronisation.
    mine = full.batches[tr.dist.rank::tr.dist.world]
    loss_sum, count = 0.0, 0
    tr.unwrapped.eval()
    with torch.no_grad():
        for rows in mine:
            with tr.autocast():
                s, n = causal_lm_loss(tr.unwrapped, tr.tensors(rows, "eval"))
            loss_sum, count = loss_sum + s.item(), count + n
    tr.unwrapped.train()
    loss_sum, count = all_reduce_sum([loss_sum, float(count)], tr.dist)
    return loss_sum / max(1.0, count)


def save_checkpoint(tr: Trainer, state: ck.TrainState, root: Path, keep: int) -> Path:
    """Atomic checkpoint of the current state under root/checkpoint-{step} (main process writes)."""
    final = root / f"checkpoint-{state.step}"
    if tr.dist.is_main:
        tmp = root / f".tmp-checkpoint-{state.step}"
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        tr.save_fn(tmp)
        ck.save_resume_state(tmp, state, tr.optimizer)
        ck.commit_dir(tmp, final)
        ck.prune(root, keep)
    return final


def guard(tr: Trainer, state: ck.TrainState, values: tuple[float, float], scaler, root: Path, position) -> None:
    """Stop on a non-finite loss (or grad norm outside fp16 loss scaling), saving the last good state.

    The failing group's gradients are discarded and the data position rewound to `position`,
    so the saved checkpoint is exactly the state before the failed step.

    Raises:
        QwenFtError: with the step, the values and where the last good state was saved.
    """
    loss, grad_norm = values
    bad_norm = not math.isfinite(grad_norm) and not scaler.is_enabled()  # fp16 scaler skips such steps itself
    if math.isfinite(loss) and not bad_norm:
        return
    tr.optimizer.zero_grad(set_to_none=True)
    state.epoch, state.batch_offset = position
    path = save_checkpoint(tr, state, root, tr.cfg.train.save_total_limit + 1)
    raise QwenFtError(
        f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {state.step + 1} "
        f"(loss {loss}, grad norm {grad_norm}); stopped without applying it. The last good state is saved in "
        f"{path}. Lower train.learning_rate, set train.max_grad_norm, or check the data; then resume with "
        f"train.resume={path}"
    )


def run(tr: Trainer, state: ck.TrainState, logger) -> ck.TrainState:
    """Train until plan.total_steps, checkpointing and evaluating as configured."""
    c, root = tr.cfg.train, Path(tr.cfg.train.output_dir) / "checkpoints"
    scaler = torch.amp.GradScaler(tr.plan.device.type, enabled=tr.plan.precision.name == "fp16")
    cache: dict = {}
    tr.model.train()
    while state.step < tr.plan.total_steps:
        lr = lr_at(state.step, c.learning_rate, tr.plan.total_steps, tr.plan.warmup_steps, c.scheduler)
        set_lr(tr.optimizer, lr)
        position = (state.epoch, state.batch_offset)
        t0 = time.perf_counter()
        loss, grad_norm, _, n_inputs = train_step(tr, next_group(tr, state, cache), scaler)
        guard(tr, state, (loss, grad_norm), scaler, root, position)
        scaler.step(tr.optimizer)
        scaler.update()
        tr.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        speed = n_inputs * tr.dist.world / (time.perf_counter() - t0)
        record = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": speed}
        state.history.append(record)
        logger.step(state.step, record)
        if tr.data.eval is not None and c.eval_steps and state.step % c.eval_steps == 0:
            state.history.append({"step": state.step, "eval_loss": evaluate(tr)})
            logger.eval(state.step, state.history[-1]["eval_loss"])
        if c.save_steps and state.step % c.save_steps == 0 and state.step < tr.plan.total_steps:
            save_checkpoint(tr, state, root, c.save_total_limit)
    if tr.data.eval is not None and not any(h.get("step") == state.step and "eval_loss" in h for h in state.history):
        state.history.append({"step": state.step, "eval_loss": evaluate(tr)})
        logger.eval(state.step, state.history[-1]["eval_loss"])
    return state
