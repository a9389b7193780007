"""Planned rows -> padded tensors.

Packed rows carry `position_ids` that restart at 0 for every example and no attention mask:
the model derives a block-diagonal causal mask from the restarts, so no token attends across
examples. Padding at the end of a packed row is one more segment with its own positions and
ignored labels. The first label of every example is ignored, so the last token of one example
is never trained to predict the first token of the next (in an unpacked row that label is
never used by the shifted loss anyway, so packed and unpacked losses are identical).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwen_ft.data.chatml import IGNORE_INDEX


def collate(rows: Sequence[Sequence[dict]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Pad a micro-batch of rows (each a list of examples with input_ids and labels).

    Returns:
        packed: input_ids, labels, position_ids; unpacked: input_ids, labels, attention_mask.
    """
    ids, labels, pos = [], [], []
    for row in rows:
        if not packed and len(row) != 1:
            raise ValueError("unpacked rows hold exactly one example")
        ids.append([t for ex in row for t in ex["input_ids"]])
        labels.append([t for ex in row for t in [IGNORE_INDEX, *ex["labels"][1:]]])
        pos.append([p for ex in row for p in range(len(ex["input_ids"]))])
    width = max(len(r) for r in ids)
    out = {
        "input_ids": torch.tensor([r + [pad_id] * (width - len(r)) for r in ids]),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels]),
    }
    if packed:
        out["position_ids"] = torch.tensor([r + list(range(width - len(r))) for r in pos])
    else:
        out["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    return out
