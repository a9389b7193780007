"""model.host_embedding: the frozen input embedding in host memory, its rows looked up with the batch. On a CPU
host and device are one, so the same code paths run and the steps must be bitwise those of the embedding
kept in the model: the same losses and the same adapter weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def untied_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with an output layer of its own (the host embedding needs one)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("untied") / "model"
    shutil.copytree(tiny_model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    torch.manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(
        model.lm_head.weight.detach().clone() + 0.02 * torch.randn_like(model.lm_head.weight)
    )
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_host_embedding_steps_equal_the_embedding_on_the_device(run_config, untied_dir, tmp_path, dtype, capsys):
    from qwen_ft.cli.main import main

    results = {}
    for host in (False, True):
        out = tmp_path / f"host-{host}"
        args = [f"model.path={untied_dir}", f"model.dtype={dtype}", f"model.host_embedding={host}"]
        assert main(["train", run_config(train={"max_steps": 3}), *args, f"train.output_dir={out}"]) == 0
        losses = [h["loss"] for h in json.loads((out / "train_history.json").read_text())]
        results[host] = losses, load_file(out / "adapter_model.safetensors")
    said = capsys.readouterr().out
    assert "input embedding (151,936 x 32, " in said and "in host memory" in said
    assert results[True][0] == results[False][0]  # bitwise: the same floats
    assert results[True][1].keys() == results[False][1].keys()
    for name, tensor in results[False][1].items():
        assert torch.equal(results[True][1][name], tensor), name


def test_host_embedding_is_refused_where_it_cannot_serve_and_estimated_without_the_table(
    run_config, tiny_model_dir, untied_dir, capsys
):
    from qwen_ft.cli.main import main
    from qwen_ft.config.load import load_config
    from qwen_ft.model.shape import Shape
    from qwen_ft.recipe.estimate import peak_of

    assert main(["train", run_config(), "model.host_embedding=true"]) == 1  # the tiny model ties its head
    assert "ties its output layer to the input embedding" in capsys.readouterr().err
    assert main(["train", run_config(), "model.host_embedding=true", "lora.train_embeddings=true"]) == 1
    assert "model.host_embedding: true with lora.train_embeddings: true" in capsys.readouterr().err
    shape = Shape.from_config(json.loads((untied_dir / "config.json").read_text()))
    on, off = (
        peak_of(
            load_config(run_config(), [f"model.path={untied_dir}", f"model.host_embedding={v}"]),
            shape,
            "bf16",
            1,
            0,
            False,
        )
        for v in (True, False)
    )
    assert off.parts["weights"] - on.parts["weights"] == shape.vocab * shape.hidden * 2
