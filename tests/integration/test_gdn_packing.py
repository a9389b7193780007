"""Packed rows through Qwen3.5's Gated DeltaNet layers equal their conversations one by one (CPU, fp32).

The tiny model's GDN decay is made slow (A_log = -6: the state keeps ~all of the previous
conversation), so a leak shows: with restarting position_ids alone, transformers' layers mix the
previous conversation into the next one (the first test measures that), and qwen-ft's segment
indices keep them apart. Small vocabulary on purpose: tokenization is not the point here.
"""

from __future__ import annotations

import pytest
import torch

from qwen_ft.data.collate import collate
from qwen_ft.model.attention import model_attn_name
from qwen_ft.model.linear_attention import install_packed_gdn
from qwen_ft.train.loss import causal_lm_loss, model_inputs
from tests.integration.test_packing_exact import VOCAB, examples


def tiny_hybrid(attn: str = "sdpa", slow_decay: bool = True):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    cfg = Qwen3_5TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e6,
            "partial_rotary_factor": 0.25,
            "mrope_section": [1, 1, 0],
            "mrope_interleaved": True,
        },
    )
    cfg._attn_implementation = model_attn_name(attn)
    model = Qwen3_5ForCausalLM(cfg)
    assert cfg.layer_types.count("linear_attention") == 3
    if slow_decay:
        for module in model.modules():
            if type(module).__name__.endswith("GatedDeltaNet"):
                module.A_log.data.fill_(-6.0)
    return model


ROWS_1 = [[0, 1, 2]]  # micro-batch 1: three conversations in one row
ROWS_2 = [[0, 1, 2], [3, 4]]  # micro-batch 2: the second row shorter, padded as a segment of its own


def logits_of(model, batch):
    with torch.no_grad():
        return model(**model_inputs(batch), use_cache=False).logits


def worst_logit_diff(model, rows, exs, batch, reference=None):
    """max |packed logits - the same conversation alone| over every real token; alone means unpacked
    through `reference` (stock transformers with the same weights; default `model` itself)."""
    flat = "cu_seq_lens_q" in batch
    logits = logits_of(model, batch)
    reference = reference or model
    worst, offset = 0.0, 0
    for r, row in enumerate(rows):
        start = offset if flat else 0
        for i in row:
            n = len(exs[i]["input_ids"])
            alone = logits_of(reference, collate([[exs[i]]], 0, packed=False))[0]
            got = logits[0, start : start + n] if flat else logits[r, start : start + n]
            worst = max(worst, (got - alone).abs().max().item())
            start += n
        offset = start
    return worst


def test_restarting_positions_alone_leak_through_gdn_layers():
    """What qwen-ft's indices fix: stock transformers, packed by position_ids only, mixes conversations."""
    model = tiny_hybrid().eval()
    exs = examples([7, 12, 5])
    leaky = worst_logit_diff(model, ROWS_1, exs, collate([[exs[i] for i in r] for r in ROWS_1], 0, packed=True))
    assert leaky > 1e-2, leaky


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
@pytest.mark.parametrize("rows", [ROWS_1, ROWS_2], ids=["mb1", "mb2"])
def test_packed_logits_equal_one_by_one(attn, rows):
    model = tiny_hybrid(attn).eval()
    assert install_packed_gdn(model) == 3
    exs = examples([7, 12, 5, 9, 3])
    batch = collate([[exs[i] for i in r] for r in rows], 0, packed=True, flat=attn == "varlen", segments=True)
    stock = tiny_hybrid("sdpa").eval()  # same seed, same weights; conversations run alone, unpacked
    assert worst_logit_diff(model, rows, exs, batch, stock) < 1e-5


@pytest.mark.parametrize("rows", [ROWS_1, ROWS_2], ids=["mb1", "mb2"])
def test_packed_step_loss_and_every_gradient_equal_one_by_one(rows):
    """One training step's summed loss and the gradient of every parameter, packed vs one conversation
    at a time (qwen-ft's own loss), in fp32."""
    model = tiny_hybrid().train()
    install_packed_gdn(model)
    exs = examples([7, 12, 5, 9, 3], seed=1)

    loss, n = causal_lm_loss(model, collate([[exs[i] for i in r] for r in rows], 0, packed=True, segments=True))
    loss.backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref_loss, ref_n = torch.zeros(()), 0
    for i in sorted(i for r in rows for i in r):
        part, k = causal_lm_loss(model, collate([[exs[i]]], 0, packed=False))
        part.backward()
        ref_loss, ref_n = ref_loss + part.detach(), ref_n + k
    assert n == ref_n
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, ref_loss.item())
    worst = max((packed[k] - p.grad).abs().max().item() for k, p in model.named_parameters())
    gdn = [k for k in packed if ".linear_attn." in k]
    assert gdn and all(packed[k].abs().sum() > 0 for k in gdn if "A_log" in k)  # the GDN layers were trained
    assert worst < 1e-5, worst
