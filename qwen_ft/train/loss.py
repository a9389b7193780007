"""Causal-LM loss that projects only the positions whose next token is learned.

The output layer is the largest matmul of a Qwen model (151,936 rows); most positions of a
ChatML example are masked (system/user turns), so the model is asked for logits only at
positions whose next-token label is learned (`logits_to_keep` with explicit indices), through
the model's own forward so DDP/DeepSpeed hooks still run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen_ft.data.chatml import IGNORE_INDEX


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward kwargs of a collated batch (position_ids when packed, attention_mask when padded)."""
    keys = ("input_ids", "position_ids", "attention_mask")
    return {k: batch[k] for k in keys if k in batch}


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over learned labels, and how many labels that is.

    Position t predicts labels[:, t + 1]; only positions where some row learns that label are
    projected through the output layer.
    """
    target = batch["labels"][:, 1:]
    keep = (target != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:  # still run the forward so every process takes part in the same collectives
        keep = torch.zeros(1, dtype=torch.long, device=target.device)
    out = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep)
    logits = out.logits.float()
    wanted = target[:, keep]
    loss = F.cross_entropy(logits.flatten(0, 1), wanted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((wanted != IGNORE_INDEX).sum())
