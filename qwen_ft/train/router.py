"""The router's load-balancing loss of a mixture of experts, as transformers defines it.

transformers adds `router_aux_loss_coef * load_balancing_loss_func(...)` to its own loss, given
labels and `output_router_logits`. qwen-ft computes its own loss (only learned positions reach the
output layer), so it adds the term itself: forward hooks on the routers take their logits (as
transformers' own output recorder does) during the training forward only, never during an
activation-checkpointing recomputation, and the model's own `load_balancing_loss_func` runs over
the real tokens of the micro-batch: padding is masked out, and a packed row holds exactly the
tokens the same conversations hold unpacked, so packed equals unpacked.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

import torch


class RouterLoss:
    """Captures router logits around a forward and turns them into the load-balancing loss."""

    def __init__(self, model: Any, coef: float):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        text = base.config.get_text_config()
        self.coef, self.num_experts, self.top_k = coef, text.num_experts, text.num_experts_per_tok
        self.balance = sys.modules[type(base).__module__].load_balancing_loss_func
        self.routers = [m for m in base.modules() if type(m).__name__.endswith("TopKRouter")]
        if not self.routers:
            raise ValueError(f"{type(base).__name__} has no TopKRouter modules to take router logits from")
        self._logits: list[torch.Tensor] | None = None  # a list while capturing
        self._captured: list[torch.Tensor] = []
        for router in self.routers:
            router.register_forward_hook(self._capture)

    def _capture(self, module, args, output) -> None:
        # the policy's training pass only: a preference loss's reference and KL passes (no_grad) run the
        # same routers within the same step
        if self._logits is not None and torch.is_grad_enabled():
            self._logits.append(output[0])

    @contextmanager
    def capturing(self):
        """Around the training forward: the router logits of that forward, and of nothing else."""
        self._logits = []
        try:
            yield
        finally:
            self._captured, self._logits = self._logits, None

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The load-balancing loss of the forward just captured, over the batch's real tokens."""
        logits, self._captured = self._captured, []
        if len(logits) != len(self.routers):
            raise RuntimeError(f"captured {len(logits)} router outputs for {len(self.routers)} routers")
        return self.balance(tuple(logits), self.num_experts, self.top_k, real_tokens(batch))


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """1 for real tokens, 0 for padding ([rows, width]); None when the batch has no padding."""
    return batch.get("attention_mask", batch.get("token_mask"))


def router_coef(cfg_coef: float | None, model: Any) -> float:
    """train.router_aux_loss_coef, or the checkpoint's router_aux_loss_coef."""
    if cfg_coef is not None:
        return cfg_coef
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return float(getattr(base.config.get_text_config(), "router_aux_loss_coef", 0.0) or 0.0)
