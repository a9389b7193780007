"""Memory estimator: exact parameter counts and the structure of the estimate (not GPU-calibrated)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_ft.cli.main import main
from qwen_ft.config.load import config_from_dict
from qwen_ft.model.shape import Shape
from qwen_ft.recipe.estimate import peak_of
from qwen_ft.sizing.memory import GB, fits, trainable_params
from tests.conftest import ASSETS


@pytest.mark.parametrize("family, tied", [("qwen2", False), ("qwen2", True), ("qwen3", True), ("qwen3", False)])
def test_parameter_count_is_exact(family, tied):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    cls = Qwen2Config if family == "qwen2" else Qwen3Config
    config = cls(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert Shape.from_config(config.to_dict()).params() == sum(p.numel() for p in model.parameters())


def test_lora_trainable_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cfg = config_from_dict({"model": {"path": "m"}, "data": {"train_files": ["d"]}, "lora": {"r": 4}})
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_config(config),
        LoraConfig(r=4, target_modules=list(Shape.from_config(config.to_dict()).linear_shapes())),
    )
    expected = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable_params(cfg.method_spec, Shape.from_config(config.to_dict())) == expected


QWEN_7B_DIR = ASSETS / "qwen1.5-7b"  # config.json only: the estimator reads nothing else
QWEN_7B = json.loads((QWEN_7B_DIR / "config.json").read_text())


def run_cfg(**sections):
    raw = {
        "model": {"path": "m"},
        "data": {"train_files": ["d"], "max_length": 2048},
        "train": {"micro_batch_size": 1},
    }
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(raw)


def test_estimate_structure():
    shape = Shape.from_config(QWEN_7B)
    assert round(shape.params() / 1e9, 2) == 7.72
    lora = peak_of(run_cfg(method="lora"), shape, "bf16", 1, 0, False)
    qlora = peak_of(run_cfg(method="qlora"), shape, "bf16", 1, 0, False)
    assert qlora.parts["weights"] < 0.4 * lora.parts["weights"]
    full1 = peak_of(run_cfg(method="full"), shape, "bf16", 8, 1, False)
    full3 = peak_of(run_cfg(method="full"), shape, "bf16", 8, 3, False)
    assert full3.parts["weights"] == pytest.approx(full1.parts["weights"] / 8)
    assert peak_of(run_cfg(method="full"), shape, "bf16", 8, 3, True).parts["optimizer"] == 0
    no_ckpt = peak_of(run_cfg(method="lora", model={"gradient_checkpointing": False}), shape, "bf16", 1, 0, False)
    assert no_ckpt.parts["activations"] > 5 * lora.parts["activations"]
    unchunked = peak_of(run_cfg(method="lora", train={"loss_chunk_tokens": 0}), shape, "bf16", 1, 0, False)
    assert unchunked.moments["loss step"] > 2 * lora.moments["loss step"] - 2 * 159_907_840  # 2048 vs 1024 rows
    assert fits(lora, 80) and not fits(lora, lora.total / GB)


def test_7b_lora_2048_by_hand():
    """Qwen-7B, LoRA r 64 on all linear layers, 1 x 2048 tokens, bf16, checkpointing, chunks of 1024."""
    e = peak_of(run_cfg(method="lora", lora={"r": 64}), Shape.from_config(QWEN_7B), "bf16", 1, 0, False)
    params, lora = 7_721_324_544, 32 * 64 * (4 * 8192 + 2 * 15104 + 15104)
    assert lora == 159_907_840
    assert e.parts == {
        "weights": 2 * params,
        "trained fp32": 4 * lora,
        "gradients": 4 * lora,
        "optimizer": 8 * lora,
        "activations": 2048 * 32 * 4096 * 2,
    }  # checkpointed layer inputs
    assert e.moments == {
        # one chunk of logits, d loss / d hidden kept for every learned position, autocast's bf16 LoRA copies
        "loss step": 1024 * 151936 * 11 + 2048 * 4096 * 2 + 2 * lora,
        "layer replay": 2048 * 34 * 4096,
    }  # Korthikanti's 34*H bytes, not 34*H*2
    assert e.total == sum(e.parts.values()) + e.moments["loss step"]  # the moments never add up
    assert e.total / GB == pytest.approx(19.173, abs=1e-3)  # H100, 2026-11-22: 18.87 GiB measured
    emb = peak_of(
        run_cfg(method="lora", lora={"r": 64, "train_embeddings": True}),
        Shape.from_config(QWEN_7B),
        "bf16",
        1,
        0,
        False,
    )
    assert emb.moments["loss step"] - e.moments["loss step"] == 151936 * 4096 * (4 + 2 * 2)  # fp32 d/d head;
    # autocast's bf16 copies of the two trained fp32 embedding matrices


def test_quantized_weights_by_hand():
    shape = Shape.from_config(QWEN_7B)
    linear, other = 6_476_005_376, 1_245_319_168
    assert shape.linear_params() == linear and shape.other_params() == other
    bnb = peak_of(run_cfg(method="qlora"), shape, "bf16", 1, 0, False).parts["weights"]
    assert bnb == linear * (0.5 + 1 / 64 + 4 / 16384) + 2 * other  # nf4 codes + double-quantized absmax
    gptq = peak_of(
        run_cfg(method="qlora", quant={"backend": "gptq"}), shape, "bf16", 1, 0, False, gptq_group=128
    ).parts["weights"]
    square = 4096 * 4096 / 2 + 32 * 4096 * 2.5 + 4096 * 4  # q/k/v/o: codes, zeros+scales per group, g_idx
    wide = 4096 * 11008 / 2 + 32 * 11008 * 2.5 + 4096 * 4  # gate/up
    down = 11008 * 4096 / 2 + 86 * 4096 * 2.5 + 11008 * 4  # 11008 / 128 = 86 groups
    assert gptq == 32 * (4 * square + 2 * wide + down) + 2 * other


def test_estimate_cli(tmp_path, capsys):
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(QWEN_7B_DIR)}, "data": {"train_files": ["d.jsonl"]}}))
    assert main(["estimate", str(cfg), "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "7.72B parameters" in out and "fits a 80 GiB GPU" in out
    assert main(["estimate", str(cfg), "--gpu-memory", "8"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_estimate_cli_reads_the_gptq_group(tmp_path, capsys):
    """group_size -1 (one group per column) costs less than groups of 128, never 'groups of 1'."""
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tmp_path)},
                "data": {"train_files": ["d.jsonl"]},
                "method": "qlora",
                "quant": {"backend": "gptq"},
            }
        )
    )
    weights = {}
    for group in (128, -1):
        quant = {"quant_method": "gptq", "bits": 4, "group_size": group}
        (tmp_path / "config.json").write_text(json.dumps({**QWEN_7B, "quantization_config": quant}))
        main(["estimate", str(cfg)])
        line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("weights"))
        weights[group] = float(line.split()[1])
    assert 0 < weights[-1] < weights[128] < weights[-1] + 0.2


def test_qwen3_5_composite_counts_are_exact_and_lora_matches_peft():
    """The hybrid shape (GDN + gated attention) with its vision tower, against stock transformers/peft on the
    meta device: the Qwen3.5-9B config (9.41B parameters, 0.45B of them the vision tower)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    from qwen_ft.model.families import FAMILIES

    raw = json.loads((ASSETS / "qwen3.5-9b" / "config.json").read_text())
    shape = Shape.from_config(raw)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(ASSETS / "qwen3.5-9b"))
    assert shape.params() == sum(p.numel() for p in model.parameters()) == 9_407_453_936
    assert shape.frozen_params == sum(p.numel() for p in model.model.visual.parameters())
    assert shape.gdn.layers == 24 and shape.attention_layers == 8
    cfg = config_from_dict({"model": {"path": "m"}, "data": {"train_files": ["d"]}, "lora": {"r": 8}})
    family = FAMILIES["qwen3_5"]
    with torch.device("meta"):
        peft_model = get_peft_model(
            model,
            LoraConfig(r=8, target_modules=list(family.lora_targets), exclude_modules=r"(.*\.)?model\.visual(\..*)?"),
        )
    expected = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable_params(cfg.method_spec, shape) == expected
    full = config_from_dict({"model": {"path": "m"}, "data": {"train_files": ["d"]}, "method": "full"})
    # the tower is not trained
    assert trainable_params(full.method_spec, shape) == shape.params() - shape.frozen_params


def test_qwen3_5_estimate_counts_gdn_states_and_248k_logits(capsys):
    """`qwen-ft estimate` on the Qwen3.5-9B shape: the GDN layers' chunk states grow with the length and
    the loss step holds 248,320-wide logits."""
    from qwen_ft.sizing.memory import gdn_chunk_states

    raw = json.loads((ASSETS / "qwen3.5-9b" / "config.json").read_text())
    shape = Shape.from_config(raw)
    cfgs = {
        n: config_from_dict(
            {"model": {"path": "m"}, "data": {"train_files": ["d"], "max_length": n}, "lora": {"r": 64}}
        )
        for n in (2048, 8192)
    }
    states = {n: gdn_chunk_states(c.data.max_length, c.train.micro_batch_size, shape) for n, c in cfgs.items()}
    assert states[2048] == 32 * 32 * 128 * 128 * 4 and states[8192] == 4 * states[2048]  # 32 chunks of 64
    short, long = (peak_of(cfgs[n], shape, "bf16", 1, 0, False) for n in (2048, 8192))
    assert short.moments["layer replay"] == 2048 * 34 * 4096 + states[2048] and long.total > short.total
    half = config_from_dict(
        {"model": {"path": "m", "checkpoint_fraction": 0.5}, "data": {"train_files": ["d"], "max_length": 2048}}
    )
    assert peak_of(half, shape, "bf16", 1, 0, False).parts["GDN states"] == states[2048] * 24 * 0.5
    assert short.moments["loss step"] >= 1024 * 248_320 * 11
    config = Path(__file__).resolve().parents[2] / "configs" / "qwen3.5-9b_lora.yaml"
    assert main(["estimate", str(config), f"model.path={ASSETS / 'qwen3.5-9b'}"]) == 0
    out = capsys.readouterr().out
    assert "9.41B parameters" in out and "not yet checked against a GPU" in out


def test_moe_estimate_holds_every_expert_and_activates_top_k():
    """Qwen3-30B-A3B: weights and optimizer state count all 128 experts; the experts' activations count
    the 8 each token is routed to."""
    from qwen_ft.bench.shapes import shape_config
    from qwen_ft.sizing.memory import expert_activation_bytes

    shape = Shape.from_config(shape_config("qwen3-30b-a3b"))
    full = config_from_dict(
        {
            "model": {"path": "m", "gradient_checkpointing": False},
            "method": "full",
            "dist": {"deepspeed": "zero3"},
            "data": {"train_files": ["d"], "max_length": 1024},
        }
    )
    e = peak_of(full, shape, "bf16", 8, 3, False)
    assert e.parts["weights"] == shape.params() * 2 / 8  # every expert, sharded over 8 GPUs
    assert e.parts["optimizer"] == shape.params() * 12 / 8
    assert expert_activation_bytes(shape) == 8 * 2 * (2 * 2048 + 3 * 768)
    assert e.parts["expert activations"] == 1024 * expert_activation_bytes(shape) * 48
    dense = peak_of(full, Shape.from_config({**shape_config("qwen3-30b-a3b"), "num_experts": 0}), "bf16", 8, 3, False)
    assert "expert activations" not in dense.parts


def test_gptq_moe_weights_count_every_expert_packed():
    """Qwen3-30B-A3B-GPTQ-Int4: the 48 x 128 per-expert quantized linears are weights too (group 128), and
    a config written with transformers 5.25's num_local_experts is the same mixture of experts."""
    from dataclasses import replace

    from qwen_ft.bench.shapes import shape_config
    from qwen_ft.sizing.memory import quantized_linear_bytes

    config = shape_config("qwen3-30b-a3b")
    shape = Shape.from_config(config)
    local = {k: v for k, v in config.items() if k != "num_experts"} | {"num_local_experts": config["num_experts"]}
    assert Shape.from_config(local) == shape
    gptq = run_cfg(method="qlora", quant={"backend": "gptq"})
    assert shape.moe is not None
    no_experts = replace(shape, moe=replace(shape.moe, experts=0))
    up = 2048 * 768 / 2 + 16 * 768 * 2.5 + 2048 * 4  # gate or up: codes, zeros+scales per group, g_idx
    down = 768 * 2048 / 2 + 6 * 2048 * 2.5 + 768 * 4
    experts = quantized_linear_bytes(gptq.quant, shape, 128) - quantized_linear_bytes(gptq.quant, no_experts, 128)
    assert experts == 48 * 128 * (2 * up + down)
    print(f"experts {experts / 2**30:.1f} GiB packed")
    assert 14 * 2**30 < experts < 16 * 2**30
