"""Packed rows give exactly the per-token losses of their examples run one by one (tiny model, CPU).

Small vocabulary on purpose: real tokenization is not what this test is about.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen_ft.data.chatml import IGNORE_INDEX
from qwen_ft.data.collate import collate

VOCAB = 1000


def tiny_model(attn: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    cfg._attn_implementation = attn
    return Qwen2ForCausalLM(cfg).eval()


def examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        labels = [t if torch.rand(1, generator=g).item() < 0.6 else IGNORE_INDEX for t in ids]
        out.append({"input_ids": ids, "labels": labels})
    return out


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss at each position t for predicting labels[t] (0 where ignored); shape like labels."""
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="none", ignore_index=IGNORE_INDEX
    ).view(labels.shape[0], -1)
    return F.pad(loss, (1, 0))


def single_losses(model, ex):
    batch = collate([[ex]], pad_id=0, packed=False)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], use_cache=False)
    return out.logits[0], token_losses(out.logits, batch["labels"])[0]


def packed_outputs(model, rows, use_positions=True):
    batch = collate(rows, pad_id=0, packed=True)
    kwargs = {"position_ids": batch["position_ids"]} if use_positions else {}
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], use_cache=False, **kwargs)
    return out.logits, token_losses(out.logits, batch["labels"])


def max_diffs(model, rows, use_positions=True):
    logits, losses = packed_outputs(model, rows, use_positions)
    worst_logit = worst_loss = 0.0
    for r, row in enumerate(rows):
        start = 0
        for ex in row:
            n = len(ex["input_ids"])
            ref_logits, ref_losses = single_losses(model, ex)
            worst_logit = max(worst_logit, (logits[r, start : start + n] - ref_logits).abs().max().item())
            worst_loss = max(worst_loss, (losses[r, start : start + n] - ref_losses).abs().max().item())
            start += n
    return worst_logit, worst_loss


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_equal_examples_one_by_one(attn):
    model = tiny_model(attn)
    exs = examples([7, 12, 5, 9, 3])
    rows = [[exs[0], exs[1], exs[2]], [exs[3], exs[4]]]  # second row shorter: padded as its own segment
    logit_diff, loss_diff = max_diffs(model, rows)
    assert logit_diff < 1e-5 and loss_diff < 1e-5


def test_without_restarting_positions_examples_leak():
    # Control: the same rows with default positions attend across examples, so the check above can fail.
    model = tiny_model("sdpa")
    exs = examples([7, 12, 5])
    logit_diff, loss_diff = max_diffs(model, [exs], use_positions=False)
    assert logit_diff > 1e-3 and loss_diff > 1e-3


def test_first_label_of_each_example_is_never_learned():
    exs = examples([4, 4])
    exs[1]["labels"][0] = exs[1]["input_ids"][0]  # e.g. qwen_reference learns the leading <|im_start|>
    batch = collate([exs], pad_id=0, packed=True)
    assert batch["labels"][0, 4].item() == IGNORE_INDEX
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_unpacked_batch_equals_examples_one_by_one():
    model = tiny_model("sdpa")
    exs = examples([6, 11, 3])
    batch = collate([[e] for e in exs], pad_id=0, packed=False)
    assert batch["attention_mask"].sum(1).tolist() == [6, 11, 3]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    losses = token_losses(out.logits, batch["labels"])
    for i, ex in enumerate(exs):
        n = len(ex["input_ids"])
        ref_logits, ref_losses = single_losses(model, ex)
        assert (out.logits[i, :n] - ref_logits).abs().max().item() < 1e-5
        assert (losses[i, :n] - ref_losses).abs().max().item() < 1e-5
