"""model.offload_checkpoint_inputs on CUDA: the inputs cross to pinned host memory on the side stream and come back
for the recomputation (the previous layer's prefetched), the dropout redrawn from the forward's CUDA RNG state. The
loss and the adapters' gradients under bf16 autocast must equal the plain checkpoint's bitwise."""

from __future__ import annotations

import copy

import torch

from qwen_ft.model.adapters import lora_input_casting_off
from qwen_ft.model.load import enable_gradient_checkpointing
from qwen_ft.model.offload import offload_checkpoint_inputs


def test_offloaded_inputs_step_like_the_plain_checkpoint_on_cuda(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_ft.model.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "model", "qwen3", hidden=64, layers=4)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    enable_gradient_checkpointing(base, for_adapters=True)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False)
    plain = get_peft_model(base, config).cuda().train()
    offloaded = copy.deepcopy(plain)
    # 4 checkpointed layers; the first one's input, the embedding output made a leaf, stays (model/offload.py)
    assert offload_checkpoint_inputs(offloaded) == 4
    ids = torch.randint(0, 1000, (4, 512), device="cuda")
    results = []
    for model in (plain, offloaded, plain, offloaded):  # twice each: the second pass has warm caches
        model.zero_grad(set_to_none=True)
        torch.cuda.manual_seed(1)
        with lora_input_casting_off(model), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        with lora_input_casting_off(model):
            loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    for (want_loss, want), (got_loss, got) in (results[0:2], results[2:4]):
        assert torch.equal(got_loss, want_loss)
        assert got.keys() == want.keys() and want
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
