"""The chunked large-vocabulary loss: same loss and gradients as the standard path, lower peak memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qwen_ft.data.collate import collate
from qwen_ft.train.loss import ChunkedLoss, _use_liger, causal_lm_loss
from tests.integration.test_packing_exact import examples, tiny_model


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    loss, n = loss_fn(model, batch)
    loss.backward()
    return loss.item(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [True, False])
def test_chunked_loss_equals_standard(packed):
    model = tiny_model("sdpa").train()
    exs = examples([9, 14, 6, 11])
    rows = [[exs[0], exs[1]], [exs[2], exs[3]]] if packed else [[e] for e in exs]
    batch = collate(rows, pad_id=0, packed=packed)
    ref_loss, ref_n, ref_grads = loss_and_grads(model, causal_lm_loss, batch)
    loss, n, grads = loss_and_grads(model, ChunkedLoss(model, chunk=5), batch)
    assert n == ref_n > 0 and loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6)


def test_chunked_loss_with_lora_and_trainable_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model("sdpa"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    ).train()
    batch = collate([examples([8, 12])], pad_id=0, packed=True)
    ref = loss_and_grads(model, causal_lm_loss, batch)
    got = loss_and_grads(model, ChunkedLoss(model, chunk=3), batch)
    assert got[0] == pytest.approx(ref[0], rel=1e-6) and any("lm_head" in k for k in got[2])
    for k in got[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_tied_embeddings_and_both_chunk_paths(fused):
    """Qwen's small models tie the output layer to the embeddings: both get the head's gradient."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(cfg).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = collate([examples([9, 14]), examples([6, 11], seed=1)], pad_id=0, packed=True)
    loss_fn = ChunkedLoss(model, chunk=4, fused=fused)
    assert loss_fn.fused == fused
    ref = loss_and_grads(model, causal_lm_loss, batch)
    got = loss_and_grads(model, loss_fn, batch)
    assert got[1] == ref[1] and got[0] == pytest.approx(ref[0], rel=1e-6)
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-5, atol=1e-6)


def test_liger_kernel_only_where_it_runs(monkeypatch):
    """auto falls back to qwen-ft's chunks off CUDA (even with liger-kernel importable); liger there,
    or without the package, is an error naming the setting."""
    import qwen_ft.deps as deps
    from qwen_ft.errors import QwenFtError

    assert not ChunkedLoss(tiny_model("sdpa"), chunk=8, kernel="auto").liger
    with pytest.raises(QwenFtError, match="train.loss_kernel"):  # MissingDependency is a QwenFtError too
        ChunkedLoss(tiny_model("sdpa"), chunk=8, kernel="liger")
    monkeypatch.setattr(deps, "require", lambda name, why: None)
    monkeypatch.setattr(deps, "usable", lambda name: True)
    assert not ChunkedLoss(tiny_model("sdpa"), chunk=8, kernel="auto").liger
    with pytest.raises(QwenFtError, match="not on a CUDA GPU"):
        ChunkedLoss(tiny_model("sdpa"), chunk=8, kernel="liger")
    cuda = torch.device("cuda")  # the decision alone: no tensor is made on it
    assert _use_liger("auto", cuda) and _use_liger("liger", cuda) and not _use_liger("qwen-ft", cuda)
    with pytest.raises(QwenFtError, match="not a plain Linear"):  # a LoRA adapter on the head
        _use_liger("liger", None)
    assert not _use_liger("auto", None)
    monkeypatch.setattr(deps, "usable", lambda name: False)
    assert not _use_liger("auto", cuda)
    with pytest.raises(QwenFtError, match="do not import"):
        _use_liger("liger", cuda)


def test_fused_path_is_the_default_and_lora_on_the_head_falls_back():
    from peft import LoraConfig, get_peft_model

    assert ChunkedLoss(tiny_model("sdpa"), chunk=8).fused
    on_head = get_peft_model(tiny_model("sdpa"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    loss_fn = ChunkedLoss(on_head, chunk=3)
    assert not loss_fn.fused
    batch = collate([examples([8, 12])], pad_id=0, packed=True)
    ref, got = loss_and_grads(on_head, causal_lm_loss, batch), loss_and_grads(on_head, loss_fn, batch)
    assert got[0] == pytest.approx(ref[0], rel=1e-6)
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-5, atol=1e-6)


PEAK = """
import sys, torch
from qwen_ft.bench.measure import peak_rss_bytes  # this process's own peak, not its parent's
from transformers import Qwen2Config, Qwen2ForCausalLM
from qwen_ft.train.loss import ChunkedLoss, causal_lm_loss
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
model = Qwen2ForCausalLM(cfg)
ids = torch.randint(0, 151936, (1, 1500))
batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(1500)[None]}
kinds = {"fused": ChunkedLoss(model, 512), "checkpointed": ChunkedLoss(model, 512, fused=False)}
loss_fn = kinds.get(sys.argv[1], causal_lm_loss)
loss_fn(model, {k: v[:, :16] for k, v in batch.items()})[0].backward()  # warm up allocator and kernels
before = peak_rss_bytes() / 2**20
loss, _ = loss_fn(model, batch)
loss.backward()
print(peak_rss_bytes() / 2**20 - before, loss.item())
"""


@pytest.mark.slow
def test_chunked_loss_lowers_peak_memory():
    def peak(kind: str) -> tuple[float, float]:
        out = subprocess.run([sys.executable, "-c", PEAK, kind], capture_output=True, text=True, check=True).stdout
        mb, loss = out.split()
        return float(mb), float(loss)

    standard, checkpointed, fused = peak("standard"), peak("checkpointed"), peak("fused")
    print(
        f"loss-step peak RSS growth: standard {standard[0]:.0f} MB, checkpointed chunks {checkpointed[0]:.0f} MB, "
        f"fused chunks {fused[0]:.0f} MB"
    )
    assert fused[1] == pytest.approx(standard[1], rel=1e-5) and checkpointed[1] == pytest.approx(standard[1], rel=1e-5)
    assert fused[0] < 0.5 * standard[0]
    assert fused[0] < checkpointed[0]  # lower than the checkpointed chunks it replaces (measured: about -30%)
