"""model.fused_lora: the one-function LoRA linear equals stock peft, loss and every gradient, and keeps less."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from qwen_ft.model.fused_lora import install_fused_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from qwen_ft.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("fused") / "m", "qwen3", hidden=64, layers=2)


def pair(model_dir, dropout: float, checkpointing: bool, dtype=torch.float32):
    """Stock peft LoRA (random non-zero A and B) and an identical copy with the fused function installed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_ft.model.load import enable_gradient_checkpointing

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if checkpointing:
        enable_gradient_checkpointing(base, for_adapters=True)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(base, config).train()
    fused = copy.deepcopy(peft_model)
    assert install_fused_lora(fused) == 2 * len(TARGETS)
    return peft_model, fused


def step(model, ids, autocast: bool):
    """Loss and gradients of one step, the dropout drawn from seed 1; under autocast with peft's cast of the
    adapters' inputs to fp32 off, as qwen-ft trains (train/backends.py, lora_inputs_uncast)."""
    from qwen_ft.model.adapters import lora_input_casting_off

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with lora_input_casting_off(model) if autocast else contextlib.nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_lora_equals_peft_in_fp32(tiny_dir, dropout, checkpointing):
    peft_model, fused = pair(tiny_dir, dropout, checkpointing)
    ids = torch.randint(0, 1000, (2, 24))
    want_loss, want = step(peft_model, ids, autocast=False)
    got_loss, got = step(fused, ids, autocast=False)
    assert torch.equal(got_loss, want_loss)
    assert got.keys() == want.keys() and len(got) == 2 * 2 * len(TARGETS)  # every A and B, both layers
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_fused_lora_equals_peft_under_bf16_autocast(tiny_dir):
    """The frozen base in bf16 and the fp32 adapters under autocast, as qwen-ft trains LoRA: the same loss, bit
    for bit, and gradients as close to the fp32 computation's as peft's own. (They are not bitwise peft's:
    the gradient of the input q, k and v share is summed from three terms here and six in peft's graph, in
    bf16, so the roundings differ by about 2% of a gradient's largest entry.)"""
    peft_model, fused = pair(tiny_dir, 0.1, checkpointing=True, dtype=torch.bfloat16)
    for model in (peft_model, fused):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    exact = copy.deepcopy(peft_model).float()
    ids = torch.randint(0, 1000, (2, 24))
    want_loss, want = step(peft_model, ids, autocast=True)
    got_loss, got = step(fused, ids, autocast=True)
    _, reference = step(exact, ids, autocast=False)
    assert torch.equal(got_loss, want_loss)

    def error(grads: dict, name: str) -> float:
        return float((grads[name] - reference[name]).abs().max() / reference[name].abs().max())

    ours, theirs = sorted(error(got, n) for n in want), sorted(error(want, n) for n in want)
    assert ours[-1] <= 1.1 * theirs[-1] and ours[len(ours) // 2] <= 1.25 * theirs[len(theirs) // 2]  # worst, median
    for name in want:
        assert float((got[name] - want[name]).abs().max() / want[name].abs().max()) <= 0.04, name


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of one forward."""
    storages: dict[int, int] = {}

    def keep(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(storages.values())


def test_fused_lora_keeps_no_dropped_copies(tiny_dir):
    """With dropout, peft keeps a dropped copy of each adapted layer's input (and on a CPU the dropout's
    noise); the fused function keeps the input itself, once, and the r-wide A output."""
    peft_model, fused = pair(tiny_dir, 0.1, checkpointing=False)
    tokens = 2 * 64
    ids = torch.randint(0, 1000, (2, 64))
    ours, theirs = saved_bytes(fused, ids), saved_bytes(peft_model, ids)
    copies = 2 * tokens * 4 * (6 * 64 + 128)  # fp32, per layer: six inputs of width 64, down_proj's of 128
    print(f"saved for backward: peft {theirs:,} bytes, fused {ours:,} ({theirs - ours:,} fewer; copies {copies:,})")
    assert theirs - ours >= copies / 2


def test_a_run_with_fused_lora_trains_as_one_without(run_config, tmp_path, capsys):
    """model.fused_lora: true through the training code: the same losses step by step; refused where it
    does not apply, before anything runs."""
    import json

    from qwen_ft.cli.main import main

    runs = {}
    for fused in (False, True):
        out = tmp_path / f"fused-{fused}"
        assert (
            main(["train", run_config(train={"max_steps": 3}), f"model.fused_lora={fused}", f"train.output_dir={out}"])
            == 0
        )
        runs[fused] = [h["loss"] for h in json.loads((out / "train_history.json").read_text())]
    assert "fused LoRA function on 7 layers" in capsys.readouterr().out  # the tiny model's one layer, all seven
    assert runs[True] == pytest.approx(runs[False], rel=1e-5, abs=1e-6)
    assert main(["train", run_config(), "model.fused_lora=true", "model.compile=true"]) == 1
    assert "model.fused_lora: true with model.compile: true" in capsys.readouterr().err
