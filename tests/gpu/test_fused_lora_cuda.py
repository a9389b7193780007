"""model.fused_lora on CUDA: the dropout redrawn through the fused native_dropout kernel on the saved input, so the
adapters' gradients under bf16 autocast equal stock peft's (the CPU tests cannot reach this path)."""

from __future__ import annotations

import copy

import torch

from qwen_ft.model.adapters import lora_input_casting_off
from qwen_ft.model.fused_lora import install_fused_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_fused_lora_gradients_equal_peft_on_cuda_under_bf16_autocast(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, init_lora_weights=False)
    theirs = get_peft_model(base, config).train()
    for p in theirs.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ours = copy.deepcopy(theirs)
    assert install_fused_lora(ours) == len(TARGETS)  # the tiny model's one layer
    ids = torch.randint(0, 1000, (2, 64), device="cuda")
    grads = []
    for model in (theirs, ours):
        torch.cuda.manual_seed(1)
        with lora_input_casting_off(model), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        with lora_input_casting_off(model):
            loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want_loss, want), (got_loss, got) = grads
    assert torch.equal(got_loss, want_loss)
    # the MLP's adapters: nothing sums their gradients in another order than peft's graph (the attention's see
    # the gradient of the MLP's shared input, summed from 2 terms here and 4 in peft's), so a redrawn dropout
    # that differed from the forward's in one element would show
    mlp = [n for n in want if ".mlp." in n]
    assert len(mlp) == 6
    for name in mlp:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
