"""The FLOPs behind MFU and HFU, checked against torch's own FlopCounterMode on a real training step of tiny
dense, Qwen3.5 (Gated DeltaNet) and mixture-of-experts models, full and LoRA, as qwen-ft trains them.

Counted with eager attention and experts (the counter has no formula for the grouped-expert matmul), so every
matmul is seen: the linear layers' (`aten.mm`) must equal `step_flops`' linear part exactly; attention's
(`aten.bmm`, the full square) is exactly twice the causal count `step_flops` uses; the Gated DeltaNet
kernel's count is reported beside the model-FLOPs convention. With every layer checkpointed, what the
counter sees in addition is exactly `recompute_flops`' linear part less the tail PyTorch does not rerun.
"""

from __future__ import annotations

import json

import pytest
import torch

from qwen_ft.bench.flops import gdn_flops_per_token, hardware_flops, recompute_flops, step_flops
from qwen_ft.model.shape import Shape

LENGTH, ROWS = 64, 2  # one Gated DeltaNet chunk per row: no padding inside the kernel


@pytest.fixture
def tiny(tiny_family):
    return lambda family: tiny_family(family, layers=4)


def counted_step(model_dir, method: str, checkpointing: bool) -> tuple[dict[str, int], int]:
    """FLOPs by aten op of one forward + backward with the loss on every position, and the LoRA weights."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    from qwen_ft.model.families import model_class
    from qwen_ft.model.load import enable_gradient_checkpointing

    torch.manual_seed(0)
    model = model_class(model_dir).from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    if checkpointing:
        enable_gradient_checkpointing(model, for_adapters=method == "lora")
    elif method == "lora":
        model.enable_input_require_grads()  # as qwen-ft trains an adapter (load.enable_gradient_checkpointing)
    if method == "lora":  # the decoder's linear layers (peft's "all-linear" would also wrap the fused experts)
        targets = list(Shape.from_config(json.loads((model_dir / "config.json").read_text())).linear_shapes())
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    model.train()
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    ids = torch.randint(0, 1000, (ROWS, LENGTH))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}, adapter


@pytest.mark.parametrize(
    "family, method",
    [("qwen3", "full"), ("qwen3", "lora"), ("qwen3_moe", "full"), ("qwen3_moe", "lora"), ("qwen3_5", "lora")],
)
def test_step_flops_equal_the_flop_counter(tiny, family, method):
    model = tiny(family)
    shape = Shape.from_config(json.loads((model / "config.json").read_text()))
    ops, adapter = counted_step(model, method, checkpointing=False)
    tokens = ROWS * LENGTH
    formula = step_flops(shape, method, LENGTH, ROWS, learned=tokens, adapter_params=adapter)
    attention = tokens * shape.attention_layers * 6 * LENGTH * shape.heads * shape.head_dim
    gdn = tokens * gdn_flops_per_token(shape)
    assert ops["mm"] == formula - attention - gdn  # every linear layer, router, expert, adapter and the head
    kernel = ops["bmm"] - 2 * attention  # eager attention computes the whole square, the causal count half
    if shape.gdn is None:
        assert kernel == 0
    else:  # the delta rule's convention against the torch kernel, which also builds each chunk's inverse
        print(f"Gated DeltaNet: the kernel's matmuls are {kernel / gdn:.2f}x the model-FLOPs convention")
        assert gdn <= kernel <= 2 * gdn


@pytest.mark.parametrize("method", ["lora", "full"])
def test_recompute_flops_are_what_checkpointing_adds(tiny, method):
    """HFU's extra: with every decoder layer checkpointed, their forward runs again, all but its tail: PyTorch's
    non-reentrant checkpoint stops once the last activation the backward needs is rebuilt, so each layer's
    last matmul, whose output nothing saves, is not rerun (full: down_proj; LoRA: down_proj's adapter B, the
    frozen down_proj before it is rerun). `recompute_flops` counts the whole forward: HFU's upper bound by that."""
    model = tiny("qwen3")
    shape = Shape.from_config(json.loads((model / "config.json").read_text()))
    plain, adapter = counted_step(model, method, checkpointing=False)
    recomputed, _ = counted_step(model, method, checkpointing=True)
    tokens, r = ROWS * LENGTH, 4
    attention = tokens * shape.attention_layers * 2 * LENGTH * shape.heads * shape.head_dim
    tail = 2 * tokens * shape.layers * shape.hidden * (r if method == "lora" else shape.intermediate)
    assert recomputed["mm"] - plain["mm"] == recompute_flops(shape, LENGTH, ROWS, adapter) - attention - tail
    assert recomputed["bmm"] - plain["bmm"] == 2 * attention  # the whole square again, forward only
    hfu = hardware_flops(shape, method, LENGTH, ROWS, ROWS * LENGTH, adapter)
    assert hfu == step_flops(shape, method, LENGTH, ROWS, ROWS * LENGTH, adapter) + recompute_flops(
        shape, LENGTH, ROWS, adapter
    )
