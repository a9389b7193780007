"""Flattened micro-batches (varlen attention) equal padded/packed ones: loss, gradients, no crossing.

On CPU the varlen forward runs its reference (causal SDPA per conversation); tests/gpu checks
torch's kernel against the same numbers. Small vocabulary: tokenization is not the point.
"""

from __future__ import annotations

import pytest
import torch

from qwen_ft.data.collate import collate
from qwen_ft.model.attention import model_attn_name
from qwen_ft.train.loss import ChunkedLoss, causal_lm_loss
from tests.integration.test_loss import loss_and_grads
from tests.integration.test_packing_exact import examples, tiny_model

ROWS = [[0, 1], [2, 3, 4]]  # two rows per micro-batch, several conversations per row


def micro_batch(packed: bool, flat: bool):
    exs = examples([9, 14, 6, 11, 7])
    rows = [[exs[i] for i in r] for r in ROWS] if packed else [[e] for e in exs]
    return collate(rows, pad_id=0, packed=packed, flat=flat)


def twin_models():
    """The same weights under sdpa and under the registered varlen forward."""
    ref = tiny_model("sdpa").train()
    flat = tiny_model(model_attn_name("varlen")).train()
    flat.load_state_dict(ref.state_dict())
    return ref, flat


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_flat_equals_padded(packed, chunked):
    ref_model, flat_model = twin_models()
    loss_fn = (lambda m: ChunkedLoss(m, chunk=5)) if chunked else (lambda m: causal_lm_loss)
    ref = loss_and_grads(ref_model, loss_fn(ref_model), micro_batch(packed, flat=False))
    got = loss_and_grads(flat_model, loss_fn(flat_model), micro_batch(packed, flat=True))
    assert got[1] == ref[1] > 0 and got[0] == pytest.approx(ref[0], rel=1e-6)
    assert got[2].keys() == ref[2].keys()
    for k in got[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-5, atol=1e-6)


def test_flat_row_layout():
    batch = micro_batch(packed=True, flat=True)
    assert batch["input_ids"].shape == (1, 9 + 14 + 6 + 11 + 7)
    assert batch["cu_seq_lens_q"].tolist() == [0, 9, 23, 29, 40, 47] and batch["max_length_q"] == 14
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and "attention_mask" not in batch


def test_no_attention_across_conversations():
    """Changing one conversation's tokens leaves every other conversation's logits unchanged."""
    _, model = twin_models()
    model.eval()
    batch = micro_batch(packed=True, flat=True)
    keys = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    with torch.no_grad():
        before = model(**{k: batch[k] for k in keys}).logits
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][0, 9:23] = (changed["input_ids"][0, 9:23] + 1) % 1000  # conversation 2 only
        after = model(**{k: changed[k] for k in keys}).logits
    same = torch.ones(before.shape[1], dtype=torch.bool)
    same[9:23] = False
    torch.testing.assert_close(after[0, same], before[0, same], rtol=0, atol=0)
    assert not torch.allclose(after[0, 9:23], before[0, 9:23])


def test_varlen_refuses_unflattened_batch():
    _, model = twin_models()
    batch = micro_batch(packed=True, flat=False)
    with pytest.raises(ValueError, match="one flattened row"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])


def test_varlen_refuses_a_sliding_window():
    from qwen_ft.model.attention import varlen_attention_forward

    q = torch.zeros(1, 4, 6, 8)
    with pytest.raises(ValueError, match="sliding window"):
        varlen_attention_forward(
            None, q, q, q, None, sliding_window=4, cu_seq_lens_q=torch.tensor([0, 6]), max_length_q=6
        )
