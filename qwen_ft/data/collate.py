"""Planned rows -> padded tensors.

Packed rows carry `position_ids` that restart at 0 for every example and no attention mask:
the model derives a block-diagonal causal mask from the restarts, so no token attends across
examples. Padding at the end of a packed row is one more segment with its own positions and
ignored labels. The first label of every example is ignored, so the last token of one example
is never trained to predict the first token of the next (in an unpacked row that label is
never used by the shifted loss anyway, so packed and unpacked losses are identical).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from qwen_ft.data.chatml import IGNORE_INDEX

# passed down to every layer as kwargs (model/linear_attention.py)
GATHER, SCATTER, GROUPS = "gdn_gather", "gdn_scatter", "gdn_groups"


def collate(
    rows: Sequence[Sequence[dict]], pad_id: int, packed: bool, flat: bool = False, segments: bool = False
) -> dict[str, torch.Tensor]:
    """Pad a micro-batch of rows (each a list of examples with input_ids and labels).

    With `flat` (varlen attention kernels) every example of every row goes into one padding-free
    row instead; see `flatten`. With `segments` (models with Gated DeltaNet layers) packed and flat
    batches also carry the indices that keep those layers' conv and state inside each example
    (`segment_indices`).

    Returns:
        packed: input_ids, labels, position_ids, token_mask; unpacked: input_ids, labels, attention_mask; both:
        learned_index and learned_columns (see `learned_indices`).
    """
    if flat:
        out = flatten([ex for row in rows for ex in row])
        lengths = [[len(ex["input_ids"]) for row in rows for ex in row]]
        return {**out, **segment_indices(lengths, sum(lengths[0]))} if segments else out
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
        # which tokens are real (not tail padding): not a model input, for the router loss of an MoE
        out["token_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    else:
        out["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    out.update(learned_indices(out["labels"]))
    if packed and segments:
        out.update(segment_indices([[len(ex["input_ids"]) for ex in row] for row in rows], width))
    return out


def collate_pairs(
    rows: Sequence[Sequence[dict]], pad_id: int, packed: bool, flat: bool = False, segments: bool = False
) -> dict:
    """`collate` for preference pairs (input_ids/labels of the chosen sequence, rejected_ids/rejected_labels):
    each pair becomes its chosen then its rejected sequence, side by side in a packed row or in two rows
    of their own, so sequence 2k is pair k's chosen and 2k+1 its rejected; `n_units` counts the pairs (what
    the loss averages over) and `n_sequences` the sequences."""
    if packed or flat:
        sequences = [[seq for pair in row for seq in _sides(pair)] for row in rows]
    else:
        sequences = [[seq] for row in rows for pair in row for seq in _sides(pair)]
    out: dict = collate(sequences, pad_id, packed, flat, segments)
    width = out["input_ids"].shape[1] - 1  # flat positions count in labels[:, 1:]
    layout = [[seq for row in sequences for seq in row]] if flat else sequences
    n_pairs = sum(len(row) for row in rows)
    return {**out, "n_units": n_pairs, "n_sequences": 2 * n_pairs, "prompt_index": _prompt_index(layout, width)}


def _prompt_index(layout: Sequence[Sequence[dict]], width: int) -> torch.Tensor:
    """Flat positions into labels[:, 1:] of the chosen sequences' prompt tokens after their first (what
    ORPO's NLL learns besides the completion, as TRL's ORPOTrainer does), in a layout of rows of sequences."""
    index: list[int] = []
    number = 0  # sequences are chosen, rejected, chosen, ... in layout order
    for r, row in enumerate(layout):
        offset = 0
        for seq in row:
            if number % 2 == 0:
                prompt = _prompt_length(seq["labels"])
                start = r * width + offset
                index.extend(range(start, start + prompt - 1))
            offset, number = offset + len(seq["input_ids"]), number + 1
    return torch.tensor(index, dtype=torch.long)


def collate_unpaired(
    rows: Sequence[Sequence[dict]],
    pad_id: int,
    packed: bool,
    flat: bool = False,
    segments: bool = False,
    max_length: int | None = None,
) -> dict:
    """`collate` for KTO examples (input_ids, labels, desirable, and their dataset `index`), with the
    mismatched sequences KTO estimates its KL term from, collated the same way under `kl_` keys.

    TRL's: example i's KL sequence is its prompt followed by the completion of the example before it (by
    dataset index, within the micro-batch, the first taking the last's), cut at max_length."""
    order = sorted((ex for row in rows for ex in row), key=lambda ex: ex["index"])
    before = {ex["index"]: order[i - 1] for i, ex in enumerate(order)}
    kl_rows = [[_mismatched(ex, before[ex["index"]], max_length) for ex in row] for row in rows]
    out: dict = collate(rows, pad_id, packed, flat, segments)
    kl = collate(kl_rows, pad_id, packed, flat, segments)
    desirable = torch.tensor([bool(ex["desirable"]) for row in rows for ex in row])
    return {**out, "desirable": desirable, "n_units": len(order), "n_sequences": len(order)} | {
        f"kl_{k}": v for k, v in kl.items()
    }


def _mismatched(ex: dict, other: dict, max_length: int | None) -> dict:
    """`ex`'s prompt followed by `other`'s completion (labels: that completion)."""
    prompt = _prompt_length(ex["labels"])
    completion = other["input_ids"][_prompt_length(other["labels"]) :]
    ids = (ex["input_ids"][:prompt] + completion)[:max_length]
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def _prompt_length(labels: Sequence[int]) -> int:
    """Leading positions that are not learned (the prompt)."""
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


def _sides(pair: dict) -> list[dict]:
    return [
        {"input_ids": pair["input_ids"], "labels": pair["labels"]},
        {"input_ids": pair["rejected_ids"], "labels": pair["rejected_labels"]},
    ]


def flatten(examples: Sequence[dict]) -> dict:
    """One row holding every example, no padding, with the varlen kernels' boundaries made here.

    `cu_seq_lens_q/k` are the cumulative example lengths (int32, starting at 0) and
    `max_length_q/k` the longest example, as plain ints, so no layer has to read them from the
    device. Labels and positions are those of packing, so the loss is the same.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    labels = torch.tensor([[t for ex in examples for t in [IGNORE_INDEX, *ex["labels"][1:]]]])
    out: dict[str, torch.Tensor | int] = {
        "input_ids": torch.tensor([[t for ex in examples for t in ex["input_ids"]]]),
        "labels": labels,
        "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }
    out.update(learned_indices(labels))
    return out


def learned_indices(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where the loss looks, worked out on the host so the device never has to be asked.

    `learned_index`: flat positions into labels[:, 1:] whose label is learned (what the chunked
    loss gathers); `learned_columns`: columns where any row learns (what the plain loss projects).
    Boolean indexing on the device would make the host wait for it at every micro-batch.
    """
    learned = labels[:, 1:] != IGNORE_INDEX
    return {
        "learned_index": learned.flatten().nonzero().squeeze(1),
        "learned_columns": learned.any(dim=0).nonzero().squeeze(1),
    }


def segment_indices(row_lengths: Sequence[Sequence[int]], width: int) -> dict:
    """Gather/scatter indices for rows of `width` tokens holding segments of the given lengths.

    Every token belongs to one segment: a row's padding (the tail after its examples) is a segment
    of its own, as in collate's packed rows. Segments are sorted by length and laid out in a few
    groups, each a [segments, longest] block right-padded with a zero vector (so short conversations
    are not padded to the longest of the batch). `gdn_gather` lists, block after block, the flat
    position (row * width + offset) of each laid-out token, or rows * width (the zero vector) for
    padding; `gdn_groups` is ((segments, longest), ...) per block; `gdn_scatter[p]` is where flat
    position p sits in the laid-out tokens.
    """
    segments = []  # (length, flat start)
    for r, lengths in enumerate(row_lengths):
        tail = width - sum(lengths)
        for start, n in zip(itertools.accumulate([0, *lengths]), [*lengths, tail], strict=False):
            if n > 0:
                segments.append((n, r * width + start))
    segments.sort(key=lambda s: -s[0])
    sentinel = len(row_lengths) * width
    gathers, groups = [], []
    for group in _length_groups(segments):
        longest = group[0][0]
        steps = torch.arange(longest)
        starts = torch.tensor([s for _, s in group]).unsqueeze(1)
        ends = torch.tensor([n for n, _ in group]).unsqueeze(1)
        gathers.append(torch.where(steps < ends, starts + steps, sentinel).flatten())
        groups.append((len(group), longest))
    gather = torch.cat(gathers)
    scatter = torch.empty(sentinel, dtype=torch.long)
    valid = gather != sentinel
    scatter[gather[valid]] = torch.arange(gather.numel())[valid]
    return {GATHER: gather, SCATTER: scatter, GROUPS: tuple(groups)}


def _length_groups(segments: list[tuple[int, int]], most: int = 4, ratio: float = 0.7) -> list[list]:
    """Split length-sorted (descending) segments into at most `most` groups, a new one where a
    segment is shorter than `ratio` of its group's longest (padding kept small, calls few)."""
    groups: list[list] = [[]]
    for seg in segments:
        if groups[-1] and seg[0] < ratio * groups[-1][0][0] and len(groups) < most:
            groups.append([])
        groups[-1].append(seg)
    return groups
