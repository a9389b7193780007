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


class ChunkedLoss:
    """The same loss as `causal_lm_loss`, with the output layer and cross-entropy run in chunks.

    A forward hook captures the decoder's final hidden states; the model's own forward (so DDP
    and DeepSpeed hooks still run) is asked for the logits of one position only. The output
    layer and cross-entropy then run over the learned positions `chunk` at a time under
    activation checkpointing, so at most one chunk's logits exist at once, in the forward and in
    the backward. Not for ZeRO-3, whose output-layer weights are partitioned outside the forward.
    """

    def __init__(self, unwrapped, chunk: int):
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        self.head = base.get_output_embeddings()  # peft wrappers (LoRA, modules_to_save) included
        self.chunk = chunk
        self._hidden = None
        base.get_decoder().register_forward_hook(self._capture)

    def _capture(self, module, args, output) -> None:
        self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def _chunk_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(hidden).float(), target, reduction="sum")

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over learned labels, and how many labels that is."""
        from torch.utils.checkpoint import checkpoint

        target = batch["labels"][:, 1:]
        learned = target != IGNORE_INDEX
        model(**model_inputs(batch), use_cache=False, logits_to_keep=1)
        hidden, self._hidden = self._hidden[:, :-1][learned], None
        target = target[learned]
        if target.numel() == 0:  # keep the graph connected so every process joins the same collectives
            return hidden.sum().float() * 0.0, 0
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, target.numel(), self.chunk):
            end = start + self.chunk
            total = total + checkpoint(self._chunk_loss, hidden[start:end], target[start:end], use_reentrant=False)
        return total, int(target.numel())
