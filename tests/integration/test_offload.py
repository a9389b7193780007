"""model.offload_checkpoint_inputs: recomputed layers read their inputs back from host memory. On a CPU host and
device are one, so the copy is a clone through the same code, and the steps must be bitwise those of the plain
checkpoint (LoRA dropout included: the recomputation redraws it from the forward's RNG state); the device copies
of the inputs must be gone between the forward and the backward."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import load_file


def trained(run_config, tmp_path, capsys, name: str, *args: str) -> tuple[list[float], dict]:
    from qwen_ft.cli.main import main

    out = tmp_path / name
    assert main(["train", run_config(train={"max_steps": 3}), *args, f"train.output_dir={out}"]) == 0
    said = "inputs of 3 recomputed layers" in capsys.readouterr().out
    assert said == ("model.offload_checkpoint_inputs=true" in args)
    losses = [h["loss"] for h in json.loads((out / "train_history.json").read_text())]
    weights = out / "adapter_model.safetensors"
    return losses, load_file(weights if weights.exists() else out / "model.safetensors")


@pytest.mark.parametrize(
    "family,extra",
    [
        ("qwen3", ["model.dtype=bf16"]),  # bf16 weights, LoRA in fp32 under autocast
        ("qwen3_5_text", ["data.packing=true"]),  # Gated DeltaNet layers, packed rows
        ("qwen3_moe", ["method=full"]),  # routed experts, every weight trained
    ],
)
def test_offloaded_inputs_give_the_plain_checkpoints_steps_bitwise(
    run_config, tiny_family, tmp_path, capsys, family, extra
):
    model = tiny_family(family, layers=3)
    common = [f"model.path={model}", "lora.dropout=0.1", *extra]
    plain = trained(run_config, tmp_path, capsys, "plain", *common)
    offloaded = trained(run_config, tmp_path, capsys, "offloaded", *common, "model.offload_checkpoint_inputs=true")
    assert offloaded[0] == plain[0]  # the same floats
    assert offloaded[1].keys() == plain[1].keys()
    for name, tensor in plain[1].items():
        assert torch.equal(offloaded[1][name], tensor), name


def layer_inputs_alive(model_dir, offload: bool) -> tuple[list[bool], float]:
    """After a LoRA forward with every layer checkpointed: is each layer's input tensor still alive (held for the
    backward)? And the loss, once backward has run (it recomputes from the host copies)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_ft.model.load import decoder_layers, enable_gradient_checkpointing
    from qwen_ft.model.offload import offload_checkpoint_inputs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    enable_gradient_checkpointing(model, for_adapters=True)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], lora_dropout=0.1)).train()
    if offload:
        assert offload_checkpoint_inputs(model) == 3
    inputs: list[weakref.ref] = []
    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(lambda m, args, kw: inputs.append(weakref.ref(args[0])), with_kwargs=True)
    ids = torch.randint(0, 1000, (2, 24))
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    alive = [r() is not None for r in inputs]
    loss.backward()
    grad = sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None)
    return alive, float(grad)


def test_the_device_copies_of_the_inputs_are_released_after_the_forward(tiny_family):
    model_dir = tiny_family("qwen3", layers=3)
    kept, plain_grad = layer_inputs_alive(model_dir, offload=False)
    released, grad = layer_inputs_alive(model_dir, offload=True)
    assert kept == [True, True, True]  # the plain checkpoint holds each input until its recomputation
    # the first layer's input stays: a LoRA run's embedding output is made a leaf that requires grad, which the
    # autograd graph itself holds (offloading it would copy it for nothing)
    assert released == [True, False, False]
    assert grad == plain_grad


def test_offloading_is_refused_without_an_eager_checkpoint_and_estimated_without_the_inputs(
    run_config, tiny_family, capsys
):
    from qwen_ft.cli.main import main
    from qwen_ft.config.load import load_config
    from qwen_ft.model.shape import Shape
    from qwen_ft.recipe.estimate import peak_of

    on = "model.offload_checkpoint_inputs=true"
    assert main(["train", run_config(), on, "model.gradient_checkpointing=false"]) == 1
    assert "model.offload_checkpoint_inputs: true with model.gradient_checkpointing: false" in capsys.readouterr().err
    assert main(["train", run_config(), on, "model.compile=true"]) == 1
    assert "model.offload_checkpoint_inputs: true with model.compile: true" in capsys.readouterr().err
    model = tiny_family("qwen3", layers=3)
    shape = Shape.from_config(json.loads((model / "config.json").read_text()))
    configs = [
        load_config(run_config(), [f"model.path={model}", f"model.offload_checkpoint_inputs={v}"])
        for v in ("false", "true")
    ]
    with_inputs, without = (peak_of(cfg, shape, "bf16", 1, 0, False) for cfg in configs)
    tokens = configs[0].train.micro_batch_size * configs[0].data.max_length
    offloaded = shape.layers - 1  # all but the first, held as the graph's leaf in a LoRA run
    assert with_inputs.parts["activations"] - without.parts["activations"] == offloaded * tokens * shape.hidden * 2
