"""The training loop: gradient accumulation, AdamW + schedule, eval, checkpoints, non-finite guard."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qwen_ft.data.collate import collate, collate_pairs, collate_unpaired
from qwen_ft.data.prepare import PreparedData, plan_for
from qwen_ft.errors import Preempted, QwenFtError
from qwen_ft.model.attention import flattens
from qwen_ft.train import checkpoint as ck
from qwen_ft.train.distributed import DistInfo, all_reduce_sum
from qwen_ft.train.feed import GroupFeed, pinned
from qwen_ft.train.loss import causal_lm_loss
from qwen_ft.train.plan import RunPlan, rank_batches
from qwen_ft.train.preempt import StopRequests, resume_command
from qwen_ft.train.protocols import Backend, LossFn, Saver, StepLogger
from qwen_ft.train.router import RouterLoss
from qwen_ft.train.saving import save_checkpoint
from qwen_ft.train.schedule import lr_at, set_lr

if TYPE_CHECKING:
    from qwen_ft.config.schema import DataConfig, TrainConfig
    from qwen_ft.model.host_embedding import HostEmbedding


@dataclass
class TrainingRun:
    """Everything the loop needs, built elsewhere (this class loads nothing)."""

    train: TrainConfig
    data_config: DataConfig  # lengths, packing
    plan: RunPlan
    dist: DistInfo
    backend: Backend  # TorchBackend or DeepSpeedBackend: forward module, backward, step, resume state
    unwrapped: torch.nn.Module  # the model itself (what evaluation runs and what is saved)
    data: PreparedData
    pad_id: int
    save_fn: Saver  # run on every rank: weights (gathered under ZeRO-3) + description
    loss_fn: LossFn = causal_lm_loss  # ChunkedLoss or this
    router: RouterLoss | None = None  # a mixture of experts' load-balancing loss, when it is trained
    reference: dict | None = None  # precomputed reference log-probs by split (train/reference_cache.py)
    host_embedding: HostEmbedding | None = None  # model.host_embedding: the lookups made with the batch

    def epoch_batches(self, epoch: int) -> list:
        """This rank's micro-batches of `epoch` (a fresh, seeded plan per epoch)."""
        plan = plan_for(self.data_config, self.train, self.data, epoch)
        return rank_batches(plan.batches, self.dist.rank, self.dist.world)

    def tensors(self, rows: list[list[int]], split: str = "train") -> dict[str, torch.Tensor]:
        """Collate one planned micro-batch onto the device (from pinned memory, without waiting)."""
        return to_device(self.host_batch(rows, split), self.plan.device)

    def host_group(self, group: list) -> list[dict[str, torch.Tensor]]:
        """Collate every micro-batch of one accumulation group on the host."""
        return [self.host_batch(rows) for rows in group]

    def host_batch(self, rows: list[list[int]], split: str = "train") -> dict[str, torch.Tensor]:
        """Collate one planned micro-batch on the host (of preference pairs: `collate_pairs`)."""
        ds = getattr(self.data, split)
        flat = sorted({i for row in rows for i in row})
        columns = ("input_ids", "labels", *(("rejected_ids", "rejected_labels") if self.data.pairs else ()))
        columns += ("desirable",) if self.data.unpaired else ()
        got = ds.select_columns(list(columns))[flat]
        lookup = {i: {"index": i, **{c: got[c][k] for c in columns}} for k, i in enumerate(flat)}
        layout = ([[lookup[i] for i in row] for row in rows], self.pad_id, self.data_config.packing)
        if self.data.unpaired:
            return collate_unpaired(*layout, flattens(self.plan.attn), self.plan.segments, self.data_config.max_length)
        out = (collate_pairs if self.data.pairs else collate)(*layout, flattens(self.plan.attn), self.plan.segments)
        if self.host_embedding is not None:  # validated: supervised fine-tuning only
            out["inputs_embeds"] = self.host_embedding(out["input_ids"])
        if self.reference is not None:
            from qwen_ft.train.reference_cache import batch_reference

            out["ref_logps"] = batch_reference(self.reference, split, rows)
        return out

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose param groups carry the learning rate."""
        return self.backend.optimizer


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a host batch to `device`; on CUDA through pinned memory, so the copy does not block the host."""
    if device.type != "cuda":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in pinned(batch).items()}


def group_at(tr: TrainingRun, position: tuple[int, int], cache: dict) -> tuple[list, tuple[int, int]]:
    """The micro-batches of the optimizer step at (epoch, offset), and the position after it.

    `cache` holds the planned epochs still ahead (reading the next epoch's first group early, for
    the feed, does not re-plan the current one).
    """
    epoch, offset = position
    if epoch not in cache:
        for old in [e for e in cache if e < epoch]:
            del cache[old]
        cache[epoch] = tr.epoch_batches(epoch)
    batches = cache[epoch]
    group = batches[offset : offset + tr.train.grad_accum]
    offset += len(group)
    return group, ((epoch + 1, 0) if offset >= len(batches) else (epoch, offset))


def next_group(tr: TrainingRun, state: ck.TrainState, cache: dict) -> list:
    """The micro-batches of the next optimizer step; advances state.epoch/batch_offset."""
    group, (state.epoch, state.batch_offset) = group_at(tr, (state.epoch, state.batch_offset), cache)
    return group


def train_step(tr: TrainingRun, hosts: list[dict[str, torch.Tensor]]) -> tuple[float, int, dict[str, float]]:
    """Forward/backward over one accumulation group of collated host batches (no optimizer step).

    The loss is the sum of token losses divided by the number of learned tokens in the whole
    group (over all processes), so every token weighs the same whatever the padding/packing.
    Token counts come from the host batches and the loss is summed on the device, so the host
    waits for the device once per group (reading the loss), not at every micro-batch. A mixture
    of experts adds its router's load-balancing loss, weighted by each micro-batch's learned tokens
    (one micro-batch: transformers' mean loss + coef * aux exactly).

    Returns:
        (language-model loss, input tokens, {"aux_loss": mean router loss} or {}) of the group.
    """
    local = sum(units(b) for b in hosts)
    n_tokens = max(1.0, all_reduce_sum([float(local)], tr.dist)[0])
    total = torch.zeros((), dtype=torch.float32, device=tr.plan.device)
    aux_total = torch.zeros((), dtype=torch.float32, device=tr.plan.device)
    with tr.backend.lora_inputs_uncast():  # once per group: it walks every module
        for i, host in enumerate(hosts):
            batch = to_device(host, tr.plan.device)
            with tr.backend.accumulating(i == len(hosts) - 1):
                with tr.backend.autocast(), router_capture(tr):
                    loss_sum, n = tr.loss_fn(tr.backend.module, batch)
                objective = loss_sum
                if tr.router is not None:
                    aux = tr.router.loss(batch).float()
                    objective = loss_sum + tr.router.coef * aux * n
                    aux_total += aux.detach() * n
                # DDP and DeepSpeed average gradients over processes; the token count is already global.
                tr.backend.backward(objective * tr.dist.world / n_tokens)
            total += loss_sum.detach()
    sums = all_reduce_sum([total.item(), aux_total.item()], tr.dist)
    extra = {"aux_loss": sums[1] / n_tokens} if tr.router is not None else {}
    return sums[0] / n_tokens, sum(int(b["input_ids"].numel()) for b in hosts), extra | loss_metrics(tr, n_tokens)


def loss_metrics(tr: TrainingRun, count: float) -> dict[str, float]:
    """The loss function's own metrics (the preference objectives' rewards/* and logps/*), summed over the
    group on every process and averaged over its `count` units; none for the plain loss."""
    take = getattr(tr.loss_fn, "take_metrics", None)
    sums = take() if take is not None else {}
    if not sums:
        return {}
    names = sorted(sums)
    totals = dict(zip(names, all_reduce_sum([sums[k] for k in names], tr.dist), strict=True))
    return metric_means(totals, count)


def metric_means(totals: dict[str, float], count: float) -> dict[str, float]:
    """Metric sums as means: over `count` units, or for a metric "a/b" over the total of "count/b" when the loss
    counts it (KTO's desirable and undesirable examples; none such in a group: not logged). rewards/margins is
    the difference of the rewards' means where the loss does not sum it itself."""
    means = {}
    for name, total in totals.items():
        kind = f"count/{name.rsplit('/', 1)[-1]}"
        n = totals.get(kind, count)
        if not name.startswith("count/") and n > 0:
            means[name] = total / n
    if "rewards/margins" not in means and {"rewards/chosen", "rewards/rejected"} <= set(means):
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means


def units(batch: dict) -> int:
    """What the loss of a batch is averaged over: its learned tokens, or (`n_units`) its preference pairs or
    KTO examples."""
    return int(batch["n_units"]) if "n_units" in batch else int(batch["learned_index"].numel())


def router_capture(tr: TrainingRun):
    """Around the training forward: the router logits it makes (a mixture of experts), else nothing."""
    from contextlib import nullcontext

    return tr.router.capturing() if tr.router is not None else nullcontext()


def eval_share(batches: list, rank: int, world: int) -> list[tuple[list, bool]]:
    """This rank's eval batches as (rows, counted), the same number on every rank.

    A strided split evaluates every batch on exactly one rank. Under ZeRO-3 every forward is a
    collective, so a rank with one batch fewer would leave the others waiting forever: short
    ranks run the set's first batch once more, not counted.
    """
    mine = [(rows, True) for rows in batches[rank::world]]
    short = -(-len(batches) // world) - len(mine)
    return mine + [(batches[0], False)] * short if short else mine


def evaluate(tr: TrainingRun) -> float:
    """Mean token loss over the whole eval set, each batch counted once across processes."""
    full = plan_for(tr.data_config, tr.train, tr.data, 0, "eval")
    loss_sum = torch.zeros((), dtype=torch.float32, device=tr.plan.device)
    count = 0
    tr.unwrapped.eval()
    # The unwrapped model runs it: evaluation needs no gradient synchronisation.
    with torch.no_grad(), tr.backend.lora_inputs_uncast():
        for rows, counted in eval_share(full.batches, tr.dist.rank, tr.dist.world):
            with tr.backend.autocast():
                s, n = tr.loss_fn(tr.unwrapped, tr.tensors(rows, "eval"))
            if counted:
                loss_sum, count = loss_sum + s.detach().float(), count + n
    tr.unwrapped.train()
    loss_metrics(tr, 1.0)  # the eval batches' rewards are not the next step's (every process takes part)
    total, n_counted = all_reduce_sum([loss_sum.item(), float(count)], tr.dist)
    return total / max(1.0, n_counted)


def guard(
    tr: TrainingRun, state: ck.TrainState, values: tuple[float, float], root: Path, position: tuple[int, int]
) -> None:
    """Stop on a non-finite loss or gradient norm, saving the last good state.

    Checked before the optimizer step, the failing group's gradients are discarded and the data
    position rewound to `position`, so the checkpoint is exactly the state before the failed step.
    (Under DeepSpeed the gradient norm is known only after its step: a non-finite norm there
    stops the run and points to the newest checkpoint.)

    Raises:
        QwenFtError: with the step, the values and where the last good state was saved.
    """
    loss, grad_norm = values
    if math.isfinite(loss) and (math.isfinite(grad_norm) or tr.backend.tolerates_inf_norm()):
        return
    tr.backend.discard()
    state.epoch, state.batch_offset = position
    path = save_checkpoint(tr, state, root, tr.train.save_total_limit + 1)
    raise QwenFtError(
        f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {state.step + 1} "
        f"(loss {loss}, grad norm {grad_norm}); stopped without applying it. The last good state is saved in "
        f"{path}. Lower train.learning_rate, set train.max_grad_norm, or check the data; then resume with "
        f"train.resume={path}"
    )


def after_step_guard(tr: TrainingRun, state: ck.TrainState, grad_norm: float, root: Path) -> None:
    """Under DeepSpeed: a non-finite gradient norm reported by the step stops the run.

    Raises:
        QwenFtError: pointing to the newest complete checkpoint.
    """
    if math.isfinite(grad_norm) or tr.backend.tolerates_inf_norm():
        return
    found = ck.list_checkpoints(root)
    where = f"resume from {found[-1]}" if found else "no checkpoint was saved yet"
    raise QwenFtError(
        f"non-finite gradient norm at step {state.step} ({grad_norm}); {where}. Lower "
        "train.learning_rate, set train.max_grad_norm, or check the data"
    )


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite, in a few fused kernels and one read.

    A NaN or inf anywhere makes its tensor's L1 norm non-finite (a sum propagates both, on every
    device); checking each tensor with isfinite().all() costs two kernel launches per tensor,
    about 800 per step for 7B LoRA. The norms are fp32 whatever the weights' dtype: an fp16 norm
    would overflow to inf for any tensor whose absolute values sum past 65504.
    """
    if not tensors:
        return True
    with torch.no_grad():
        norms = torch._foreach_norm(list(tensors), 1, dtype=torch.float32)
        return bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())


def zero3_valid_length(full: int, part: int, rank: int) -> int:
    """How many elements of rank `rank`'s ZeRO-3 partition (`part` long) hold the weight (`full`
    elements in all): the flattened weight is split in equal parts, the last ones padded."""
    return max(0, min(part, full - rank * part))


def trained_parts(model: torch.nn.Module) -> list[torch.Tensor]:
    """This process's part of every trained weight: the weight itself, or under ZeRO-3 its local
    partition (`ds_tensor`; the parameter's own data is then an empty placeholder) without the
    padding, which is uninitialised memory, not a weight."""
    parts = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        part = getattr(p, "ds_tensor", None)
        if part is None:
            parts.append(p)
            continue
        group = getattr(p, "ds_process_group", None)
        rank = torch.distributed.get_rank(group) if torch.distributed.is_initialized() else 0
        parts.append(part.view(-1)[: zero3_valid_length(getattr(p, "ds_numel", part.numel()), part.numel(), rank)])
    return [t for t in parts if t.numel()]


def weights_guard(tr: TrainingRun, state: ck.TrainState, lr: float, root: Path) -> None:
    """A step that leaves any trained weight inf or NaN (an overflowing learning rate) stops the run
    before that state can be saved as the last good one. Every process decides together: under
    ZeRO-3 each holds a different part of the weights, and one stopping alone would leave the
    others waiting in the next collective.

    Raises:
        QwenFtError: with the step, the learning rate and the newest checkpoint.
    """
    bad = 0.0 if all_finite(trained_parts(tr.unwrapped)) else 1.0
    if all_reduce_sum([bad], tr.dist)[0] == 0:
        return
    found = ck.list_checkpoints(root)
    where = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved"
    raise QwenFtError(
        f"non-finite weights after step {state.step} (learning rate {lr:g}); nothing was saved from "
        f"it, {where}. Lower train.learning_rate or set train.max_grad_norm, then resume"
    )


def train(
    tr: TrainingRun, state: ck.TrainState, logger: StepLogger, stop: StopRequests | None = None
) -> ck.TrainState:
    """Train until plan.total_steps, checkpointing and evaluating as configured; a stop signal (`stop`)
    ends it after the step it arrives in, with a checkpoint of that step.

    Raises:
        Preempted: stopped by a signal, naming the checkpoint and the command that resumes it.
    """
    cache: dict = {}
    tr.backend.module.train()
    with GroupFeed(tr.host_group, tr.plan.device) as feed:
        while state.step < tr.plan.total_steps:
            position, t0 = (state.epoch, state.batch_offset), time.perf_counter()
            hosts = feed.take(next_group(tr, state, cache))
            if state.step + 1 < tr.plan.total_steps:
                feed.prepare(group_at(tr, (state.epoch, state.batch_offset), cache)[0])
            one_step(tr, state, (hosts, position, t0), logger)
            if stop is not None and state.step < tr.plan.total_steps:
                stop_if_asked(tr, state, stop)
    if tr.data.eval is not None and not any(h.get("step") == state.step and "eval_loss" in h for h in state.history):
        state.history.append({"step": state.step, "eval_loss": evaluate(tr)})
        logger.eval(state.step, state.history[-1]["eval_loss"])
    return state


def stop_if_asked(tr: TrainingRun, state: ck.TrainState, stop: StopRequests) -> None:
    """After a step: when any process got a stop signal, all save this step's checkpoint (unless the
    step just saved one) and stop.

    Raises:
        Preempted: naming the signal, the checkpoint and the command that resumes from it.
    """
    name = stop.agreed(tr.dist)
    if name is None:
        return
    c, root = tr.train, Path(tr.train.output_dir) / "checkpoints"
    path = root / f"checkpoint-{state.step}"
    if not (c.save_steps and state.step % c.save_steps == 0):  # the same test on every process
        path = save_checkpoint(tr, state, root, c.save_total_limit)
    raise Preempted(
        f"{name} after step {state.step} of {tr.plan.total_steps}: saved {path}. Resume with: "
        f"{resume_command(tr.dist.world)}"
    )


def one_step(
    tr: TrainingRun, state: ck.TrainState, taken: tuple[list, tuple[int, int], float], logger: StepLogger
) -> None:
    """One optimizer step, with its guards, log, eval and save.

    `taken`: the group's collated host batches, the data position they were taken from (the
    non-finite guard rewinds to it) and when the step began (speed counts waiting for data).
    """
    hosts, position, t0 = taken
    c, root = tr.train, Path(tr.train.output_dir) / "checkpoints"
    lr = lr_at(state.step, c.learning_rate, tr.plan.total_steps, tr.plan.warmup_steps, c.scheduler)
    set_lr(tr.optimizer, lr)
    loss, n_inputs, extra = train_step(tr, hosts)
    grad_norm = tr.backend.clip()
    guard(tr, state, (loss, grad_norm), root, position)
    grad_norm = tr.backend.step(grad_norm)
    state.step += 1
    after_step_guard(tr, state, grad_norm, root)
    weights_guard(tr, state, lr, root)
    speed = n_inputs * tr.dist.world / (time.perf_counter() - t0)
    record = {"step": state.step, "loss": loss, **extra, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": speed}
    state.history.append(record)
    logger.step(state.step, record)
    if tr.data.eval is not None and c.eval_steps and state.step % c.eval_steps == 0:
        state.history.append({"step": state.step, "eval_loss": evaluate(tr)})
        logger.eval(state.step, state.history[-1]["eval_loss"])
    if c.save_steps and state.step % c.save_steps == 0 and state.step < tr.plan.total_steps:
        save_checkpoint(tr, state, root, c.save_total_limit)
