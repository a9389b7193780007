"""Memory estimator: exact parameter counts and the structure of the estimate (not GPU-calibrated)."""

from __future__ import annotations

import json

import pytest

from qwen_ft.cli.main import main
from qwen_ft.config.load import config_from_dict
from qwen_ft.train.memory import GB, Shape, estimate, fits, trainable_params


@pytest.mark.parametrize("family, tied", [("qwen2", False), ("qwen2", True), ("qwen3", True), ("qwen3", False)])
def test_parameter_count_is_exact(family, tied):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    cls = Qwen2Config if family == "qwen2" else Qwen3Config
    config = cls(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config)
    assert Shape.from_config(config.to_dict()).params() == sum(p.numel() for p in model.parameters())


def test_lora_trainable_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    cfg = config_from_dict({"model": {"path": "m"}, "data": {"train_files": ["d"]}, "lora": {"r": 4}})
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(config),
                                LoraConfig(r=4, target_modules=list(Shape.from_config(config.to_dict())
                                                                    .linear_shapes())))
    expected = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable_params(cfg, Shape.from_config(config.to_dict())) == expected


QWEN_7B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008}


def run_cfg(**sections):
    raw = {"model": {"path": "m"}, "data": {"train_files": ["d"], "max_length": 2048},
           "train": {"micro_batch_size": 1}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(raw)


def test_estimate_structure():
    shape = Shape.from_config(QWEN_7B)
    assert round(shape.params() / 1e9, 2) == 7.72
    lora = estimate(run_cfg(method="lora"), shape, "bf16", 1, 0, False)
    qlora = estimate(run_cfg(method="qlora"), shape, "bf16", 1, 0, False)
    assert qlora.parts["weights"] < 0.4 * lora.parts["weights"]
    full1 = estimate(run_cfg(method="full"), shape, "bf16", 8, 1, False)
    full3 = estimate(run_cfg(method="full"), shape, "bf16", 8, 3, False)
    assert full3.parts["weights"] == pytest.approx(full1.parts["weights"] / 8)
    assert estimate(run_cfg(method="full"), shape, "bf16", 8, 3, True).parts["optimizer"] == 0
    no_ckpt = estimate(run_cfg(method="lora", model={"gradient_checkpointing": False}), shape, "bf16", 1, 0, False)
    assert no_ckpt.parts["activations"] > 5 * lora.parts["activations"]
    unchunked = estimate(run_cfg(method="lora", train={"loss_chunk_tokens": 0}), shape, "bf16", 1, 0, False)
    assert unchunked.parts["logits"] == pytest.approx(2 * lora.parts["logits"])  # 2048 vs 1024 rows
    assert fits(lora, 80) and not fits(lora, lora.total / GB)


def test_estimate_cli(tmp_path, capsys):
    import yaml

    (tmp_path / "config.json").write_text(json.dumps(QWEN_7B))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(tmp_path)}, "data": {"train_files": ["d.jsonl"]}}))
    assert main(["estimate", str(cfg), "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "7.72B parameters" in out and "fits a 80 GB GPU" in out
    assert main(["estimate", str(cfg), "--gpu-memory", "8"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
