"""Preference objectives on per-sequence log-probabilities: DPO (sigmoid, ipo, hinge, robust), SimPO,
ORPO and KTO, with the metrics TRL logs under the same names.

Pure functions of summed completion log-probs (policy and, for DPO, reference) and completion lengths;
how those sums are made from packed rows is `train/preference_loss.py`'s. Each formula is TRL 1.16's
(`DPOTrainer`, `CPOTrainer` with loss_type="simpo", `ORPOTrainer`, `KTOTrainer`), term for term, so a
step equals TRL's (tests/integration/test_preference.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs of a batch of pairs (shape [pairs]) and the completions' token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor

    def averaged(self) -> PairLogps:
        """Per-token means (SimPO, ORPO and IPO's normalisation)."""
        return PairLogps(
            self.chosen / self.chosen_len.clamp(min=1),
            self.rejected / self.rejected_len.clamp(min=1),
            self.chosen_len,
            self.rejected_len,
        )


def dpo_losses(
    policy: PairLogps, reference: PairLogps, beta: float, loss_type: str, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO losses (shape [pairs]) and TRL's metrics (rewards/*, logps/*) for one batch."""
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":  # TRL normalises by each completion's length (confirmed with the IPO authors)
        ipo_delta = chosen_ratio / policy.chosen_len.clamp(min=1) - rejected_ratio / policy.rejected_len.clamp(min=1)
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use one of {', '.join(DPO_LOSSES)}")
    return losses, reward_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), policy)


def simpo_losses(
    policy: PairLogps, beta: float, gamma: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (TRL's CPOTrainer, loss_type="simpo"): length-averaged log-probs, margin gamma, no reference."""
    avg = policy.averaged()
    logits = (avg.chosen - avg.rejected) - gamma / beta
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, reward_metrics(beta * avg.chosen.detach(), beta * avg.rejected.detach(), avg)


def orpo_losses(policy: PairLogps, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO's odds-ratio term per pair (to be subtracted from the chosen NLL), on length-averaged log-probs."""
    avg = policy.averaged()
    chosen, rejected = avg.chosen.float(), avg.rejected.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    metrics = reward_metrics(beta * chosen.detach(), beta * rejected.detach(), avg)
    metrics |= {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return beta * ratio, metrics


def kto_losses(
    policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, settings
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO (TRL's KTOTrainer, loss_type="kto") per example, from summed completion log-probs: desirable
    1 - sigmoid(beta (ratio - kl)), undesirable 1 - sigmoid(beta (kl - ratio)), weighted; with the metrics
    TRL logs, counted per kind ("count/chosen" and "count/rejected" divide them, train/loop.metric_means)."""
    beta = settings.beta
    ratio = policy - reference
    chosen = settings.desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    rejected = settings.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    rewards, logps = beta * ratio.detach(), policy.detach()
    d = desirable.to(rewards.dtype)
    metrics = {"rewards/chosen": rewards * d, "logps/chosen": logps * d, "count/chosen": d}
    metrics |= {"rewards/rejected": rewards * (1 - d), "logps/rejected": logps * (1 - d), "count/rejected": 1 - d}
    return torch.where(desirable, chosen, rejected), metrics | {"kl": kl.detach().expand_as(ratio)}


def chosen_nll(policy: PairLogps, extra: torch.Tensor | float = 0.0, extra_tokens: int = 0) -> torch.Tensor:
    """Mean NLL per token of the chosen completions of a batch (plus `extra` log-probs over `extra_tokens`
    more tokens: ORPO's prompts), as one scalar: TRL's CPO and ORPO average over the micro-batch's tokens."""
    return -(policy.chosen.sum() + extra) / (policy.chosen_len.sum() + extra_tokens).clamp(min=1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branching at -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, policy: PairLogps) -> dict[str, torch.Tensor]:
    """TRL's per-pair metrics (averaged over pairs when logged)."""
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "rewards/margins": chosen - rejected,
        "logps/chosen": policy.chosen.detach(),
        "logps/rejected": policy.rejected.detach(),
    }
