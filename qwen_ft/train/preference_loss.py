"""The preference objectives as a `LossFn` (train/protocols.py): per-sequence log-probs of packed
chosen/rejected sequences, the reference's from the same batch, then the objective of
`train/preference.py`.

A micro-batch holds whole pairs: sequence 2k is pair k's chosen, 2k+1 its rejected (`collate_pairs`).
Only completion tokens are learned, and collate never learns an example's first token, so each sequence's
learned positions form one run of consecutive positions, and runs of different sequences are apart: the
run a learned position belongs to is its sequence. The output layer runs only at those positions, a
chunk at a time (under activation checkpointing while training), so no [tokens x vocabulary] logits
are held. The reference of a LoRA run is the same model with its adapter switched off (or its starting
adapter, frozen): no second copy; a full fine-tune's is a frozen copy of the base.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch.utils.checkpoint import checkpoint

from qwen_ft.model.start_adapter import REFERENCE, reference_adapter
from qwen_ft.train.loss import ChunkedLoss, head_weight, model_inputs, with_learned_indices
from qwen_ft.train.preference import PairLogps, chosen_nll, dpo_losses, kto_losses, orpo_losses, simpo_losses
from qwen_ft.train.token_logps import fused_token_logps


def learned_sequences(learned_index: torch.Tensor) -> torch.Tensor:
    """For each learned position (collate's flat `learned_index`, ascending), the number of its sequence."""
    gaps = (learned_index[1:] - learned_index[:-1]) > 1
    return torch.cat([gaps.new_zeros(1, dtype=torch.long), gaps.long().cumsum(0)])


class SequenceLogps(ChunkedLoss):
    """Per-sequence summed completion log-probs of a model's batches (its output layer, chunk by chunk)."""

    def __init__(self, unwrapped, chunk: int):
        super().__init__(unwrapped, chunk or 1024, fused=False)
        self.unwrapped = unwrapped
        self._flat_hidden: torch.Tensor | None = None

    def sequence_logps(self, model, batch, context: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed completion log-probs of each sequence of `batch`, their token counts, and (with `context`,
        for ORPO) the summed log-probs of the chosen sequences' prompt tokens (`prompt_index`), else 0."""
        model(**model_inputs(batch), use_cache=False, logits_to_keep=1)
        hidden, target = self._gather(batch)
        tokens = self._logps(hidden, target)
        seq = learned_sequences(batch["learned_index"]).to(tokens.device)
        n = int(batch["n_sequences"])
        sums = tokens.new_zeros(n).index_add(0, seq, tokens)
        prompt = tokens.new_zeros(())
        if context and self._flat_hidden is not None:
            index = batch["prompt_index"]
            flat = self._flat_hidden.index_select(0, index)
            prompt = self._logps(flat, batch["input_ids"][:, 1:].reshape(-1).index_select(0, index)).sum()
        self._flat_hidden = None
        return sums, torch.bincount(seq, minlength=n), prompt

    def _gather(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """ChunkedLoss's gather, keeping the flattened hidden states for the prompt positions."""
        if self._hidden is not None:
            self._flat_hidden = self._hidden[:, :-1].reshape(-1, self._hidden.shape[-1])
        return super()._gather(batch)

    def _logps(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs of `target`, a chunk at a time: fused through a plain output layer
        (`token_logps.py`), else (a LoRA adapter on it) checkpointed when it needs gradients."""
        weight = head_weight(self.head)
        if weight is not None:
            return fused_token_logps(hidden, weight, target, self.chunk)
        parts = []
        for start in range(0, int(target.numel()), self.chunk):
            h, t = hidden[start : start + self.chunk], target[start : start + self.chunk]
            grad = torch.is_grad_enabled() and h.requires_grad
            parts.append(checkpoint(self._token_logps, h, t, use_reentrant=False) if grad else self._token_logps(h, t))
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)

    def _token_logps(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        return logits.gather(1, target[:, None]).squeeze(1) - logits.logsumexp(dim=-1)


class PreferenceLoss(SequenceLogps):
    """Summed per-unit preference loss of a micro-batch (pairs; KTO: examples), and how many units that is.
    `frozen`: a separate frozen reference model (full fine-tuning), else the reference is the LoRA model's."""

    def __init__(self, unwrapped, objective: str, settings, chunk: int, frozen=None):
        super().__init__(unwrapped, chunk)
        self.objective, self.settings = objective, settings
        self._frozen = SequenceLogps(frozen, chunk) if frozen is not None else None
        self._sums: dict[str, torch.Tensor] = {}

    def reference(self) -> AbstractContextManager[object]:
        """The reference model: the starting adapter frozen (model.adapter), else the policy with its adapter
        switched off (peft); used under no_grad."""
        if not hasattr(self.unwrapped, "disable_adapter"):
            raise RuntimeError("a preference objective with a reference needs a LoRA or Q-LoRA model")
        if REFERENCE in self.unwrapped.peft_config:
            return reference_adapter(self.unwrapped)
        return self.unwrapped.disable_adapter()

    def release_frozen(self) -> None:
        """Drop the frozen reference model (its log-probs are precomputed)."""
        if self._frozen is not None:
            import gc

            self._frozen._hook.remove()  # the hook on its decoder holds this reader, which holds the model
            self._frozen = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def reference_logps(self, batch) -> torch.Tensor:
        """The reference's summed completion log-probs of each sequence of `batch` (precomputed, or now without
        gradients)."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad():
            if self._frozen is not None:
                return self._frozen.sequence_logps(self._frozen.unwrapped, batch)[0]
            with self.reference():
                return self.sequence_logps(self.unwrapped, batch)[0]

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        batch = with_learned_indices(batch)
        if self.objective == "kto":
            losses, metrics = self._kto(model, batch)
        else:
            losses, metrics = self._paired(model, batch)
        for name, values in metrics.items():
            self._sums[name] = self._sums.get(name, 0.0) + values.detach().float().sum()
        return losses.sum(), int(batch["n_units"])

    def _paired(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses and metrics of DPO, SimPO or ORPO."""
        orpo, s = self.objective == "orpo", self.settings
        sums, lens, prompt = self.sequence_logps(model, batch, context=orpo)
        policy = PairLogps(sums[0::2], sums[1::2], lens[0::2], lens[1::2])
        if self.objective == "simpo":
            losses, metrics = simpo_losses(policy, s.beta, s.simpo_gamma, s.label_smoothing)
            # TRL's CPO adds cpo_alpha x the chosen completions' mean NLL (per token, over the micro-batch)
            return losses + s.cpo_alpha * chosen_nll(policy), metrics
        if orpo:
            ratios, metrics = orpo_losses(policy, s.beta)
            # TRL's ORPO: the NLL of the whole chosen sequences, prompt included, per token over the micro-batch
            nll = chosen_nll(policy, prompt, batch["prompt_index"].numel())
            return nll - ratios, metrics | {"nll_loss": nll.detach().expand_as(ratios)}
        ref_sums = self.reference_logps(batch)
        reference = PairLogps(ref_sums[0::2], ref_sums[1::2], lens[0::2], lens[1::2])
        return dpo_losses(policy, reference, s.beta, s.loss_type, s.label_smoothing)

    def _kto(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example KTO losses and metrics: the policy and reference on the batch, and both (without
        gradients) on its mismatched `kl_` sequences for the KL estimate, averaged over processes as TRL does."""
        policy, _, _ = self.sequence_logps(model, batch)
        mismatched = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")} | {"n_sequences": batch["n_units"]}
        with torch.no_grad():
            kl_policy, _, _ = self.sequence_logps(self.unwrapped, mismatched)
        reference, kl_reference = self.reference_logps(batch), self.reference_logps(mismatched)
        kl = process_mean((kl_policy - kl_reference).mean()).clamp(min=0)
        return kto_losses(policy, reference, batch["desirable"], kl, self.settings)

    def take_metrics(self) -> dict[str, float]:
        """The metrics summed over units since the last call (the loop averages them over all processes,
        `train/loop.metric_means`)."""
        sums, self._sums = self._sums, {}
        return {k: float(v) for k, v in sums.items()}


def process_mean(value: torch.Tensor) -> torch.Tensor:
    """`value` averaged over the processes of a distributed run (every process calls this at the same point)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()
