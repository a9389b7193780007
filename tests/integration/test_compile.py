"""model.compile: each decoder layer compiled, its activation checkpoint inside the graph, trains exactly as eager
and recomputes in the backward pass only what the backward pass reads."""

from __future__ import annotations

import pytest

from qwen_ft.config.load import config_from_dict
from qwen_ft.errors import ConfigError
from qwen_ft.recipe import steps
from qwen_ft.recipe.run import run_training


def losses(config: str, *overrides: str) -> tuple[list[float], int]:
    """Losses of a run and how many of its modules run compiled."""
    trainer, state = run_training(steps.checked_config(config, list(overrides)), steps.distributed())
    compiled = sum(getattr(m, "_compiled_call_impl", None) is not None for m in trainer.unwrapped.modules())
    return [h["loss"] for h in state.history if "loss" in h], compiled


def test_compiled_layers_train_like_eager(run_config):
    import torch

    config = run_config(train={"max_steps": 4, "overwrite_output_dir": True}, lora={"dropout": 0.0})
    eager, none = losses(config)
    torch._dynamo.reset()
    compiled, layers = losses(config, "model.compile=true")
    assert none == 0 and layers == 1  # the tiny model's one decoder layer
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert len(set(eager)) > 1  # micro-batches of different lengths went through one dynamic-shape graph


@pytest.mark.parametrize("section, value", [("method", "qlora"), ("dist", {"deepspeed": "zero3"})])
def test_compile_refused_where_it_cannot_work(section, value):
    raw = {"model": {"path": "m", "compile": True}, "data": {"train_files": ["d"]}, section: value}
    with pytest.raises(ConfigError, match="model.compile: true"):
        config_from_dict(raw)


def test_compile_refuses_a_model_without_decoder_layers():
    import torch

    from qwen_ft.errors import QwenFtError
    from qwen_ft.model.build import compile_decoder_layers

    with pytest.raises(QwenFtError, match="no transformers decoder layers"):
        compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def counted_step(model_dir, how: str):
    """Gradients of one LoRA step (dropout on) with every layer checkpointed, and the matmuls in the compiled
    forward and backward graphs; `how`: eager, old (an eager checkpoint around each compiled layer, as
    transformers before 5.2x and a graph break at its wrapper ran it) or ours (compile_decoder_layers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch.utils.checkpoint import checkpoint
    from transformers import AutoModelForCausalLM

    from qwen_ft.model.build import compile_decoder_layers
    from qwen_ft.model.load import decoder_layers, enable_gradient_checkpointing

    counts: dict[str, list[int]] = {"fw": [], "bw": []}

    def counter(kind):
        def compiler(gm, example_inputs):
            counts[kind].append(sum(n.op == "call_function" and "mm" in str(n.target) for n in gm.graph.nodes))
            return gm.forward

        return compiler

    # the partitioner inductor uses; the graphs run as they are (no code generation: fast on a CPU)
    backend = aot_autograd(
        fw_compiler=counter("fw"), bw_compiler=counter("bw"), partition_fn=min_cut_rematerialization_partition
    )
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    enable_gradient_checkpointing(model, for_adapters=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.1)).train()
    if how == "ours":
        compile_decoder_layers(model, backend)
    elif how == "old":
        for layer in decoder_layers(model):
            layer.gradient_checkpointing = False
            inner = torch.compile(layer._call_impl, backend=backend, dynamic=True)
            layer._compiled_call_impl = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    ids = torch.randint(0, 1000, (2, 48))
    torch.manual_seed(1)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, counts


def test_the_compiled_checkpoint_recomputes_only_what_backward_reads(tmp_path):
    """Lever 1 of issue 34: the checkpoint inside the compiled graph. The gradients equal eager checkpointing
    (dropout on); an eager checkpoint around a compiled layer reruns its whole compiled forward in the
    backward pass, while the graph's own recomputation leaves out down_proj and its adapter's B, whose
    outputs nothing in the backward pass reads: two matmuls fewer per layer and step."""
    import torch

    from qwen_ft.model.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "m", "qwen3", hidden=64, layers=2)
    eager, _ = counted_step(model_dir, "eager")
    ours, mine = counted_step(model_dir, "ours")
    old, theirs = counted_step(model_dir, "old")
    for name in eager:
        torch.testing.assert_close(ours[name], eager[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(old[name], eager[name], rtol=0, atol=1e-6)
    assert len(mine["fw"]) == len(theirs["fw"]) == 1  # one graph for both layers
    ran_old = (
        2 * theirs["fw"][0] + theirs["bw"][0]
    )  # the compiled forward, again in the backward pass, then its backward
    ran_ours = mine["fw"][0] + mine["bw"][0]
    assert ran_old - ran_ours == 2, (theirs, mine)
