"""Q-LoRA on CPU: bitsandbytes 4-bit and GPTQ bases, merges (original base / dequantized), re-quantization.

The GPTQ base is made in the test setup by quantizing a tiny model with gptqmodel. The extras
are installed by scripts/install_extras.sh (CI runs it); without them these tests are skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qwen_ft.cli.main import main
from qwen_ft.errors import ConfigError
from qwen_ft.recipe import steps
from qwen_ft.recipe.run import run_training
from qwen_ft.train.distributed import DistInfo
from tests.integration.conftest import write_run_yaml

pytestmark = pytest.mark.extras("bitsandbytes", "gptqmodel")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
PROBE = torch.tensor([[151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE, use_cache=False).logits.float()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: packed 4-bit storage read as floats holds NaN patterns, which == rejects."""

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A tiny full-precision model and its 4-bit GPTQ quantization (group size 32)."""
    from qwen_ft.export.quantize import quantize_model
    from qwen_ft.model.tiny import make_tiny_model
    from tests.conftest import REPO

    root = tmp_path_factory.mktemp("qbases")
    dense = make_tiny_model(root / "dense", hidden=64, layers=1)
    report = quantize_model(str(dense), str(root / "gptq"), 4, 32, str(REPO / "data/example_chatml.jsonl"), n_calib=16)
    return {"dense": dense, "gptq": root / "gptq", "report": report}


@pytest.fixture(scope="module", params=["bnb", "gptq"])
def qlora_run(request, bases, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"qlora-{request.param}")
    cfg = tmp / "run.yaml"
    write_run_yaml(
        cfg,
        bases["dense"] if request.param == "bnb" else bases["gptq"],
        tmp,
        data={"eval_fraction": 0.1},
        method="qlora",
        quant={"backend": request.param},
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        train={
            "output_dir": str(tmp / "out"),
            "micro_batch_size": 2,
            "grad_accum": 2,
            "learning_rate": 2e-2,
            "max_steps": 8,
            "eval_steps": 2,
            "warmup_ratio": 0.1,
        },
    )
    trainer, state = run_training(steps.checked_config(str(cfg), []), CPU)
    return request.param, trainer, state, tmp / "out"


def test_qlora_trains_with_eval_between_steps(qlora_run):
    backend, _, state, out = qlora_run
    losses = [h["loss"] for h in state.history if "loss" in h]
    assert losses[-1] < losses[0], losses
    assert len([h for h in state.history if "eval_loss" in h]) == 4  # eval-mode forwards between training steps
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "qlora" and manifest["quant"]["backend"] == backend


def test_qlora_base_stays_frozen(qlora_run, bases):
    from qwen_ft.export.merge import quantized_base

    backend, trainer, _, out = qlora_run
    fresh = quantized_base(out, json.loads((out / "manifest.json").read_text())).state_dict()
    trained = trainer.unwrapped.get_base_model().state_dict()
    params = dict(trainer.unwrapped.get_base_model().named_parameters())
    trainable = {k for k, p in params.items() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable), sorted(trainable)  # the adapters train, nothing else
    base_keys = [k for k in trained if "lora_" not in k]
    assert any(not trained[k].is_floating_point() for k in base_keys)  # the packed 4-bit storage is compared too
    for key in base_keys:
        plain = key.replace(".base_layer", "").replace(".quant_linear_module", "")  # peft's wrapper names
        assert same_bits(trained[key], fresh[plain]), key


def test_qlora_save_reload_identical_logits(qlora_run):
    from peft import PeftModel

    from qwen_ft.export.merge import quantized_base

    _, trainer, _, out = qlora_run
    reloaded = PeftModel.from_pretrained(
        quantized_base(out, json.loads((out / "manifest.json").read_text())), out
    ).eval()
    trainer.unwrapped.eval()
    assert torch.equal(logits(reloaded), logits(trainer.unwrapped))


def test_qlora_merge_matches_adapter_on_base(qlora_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    backend, trainer, _, out = qlora_run
    merged_dir = tmp_path / "merged"
    assert main(["merge", str(out), "--out", str(merged_dir)]) == 0
    text = capsys.readouterr().out
    expected = "original-precision base" if backend == "bnb" else "dequantized GPTQ weights"
    assert f"merged into {expected}" in text and "perplexity merged" in text
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    trainer.unwrapped.eval()
    on_quantized = logits(trainer.unwrapped)
    if backend == "gptq":  # dequantized weights are exactly what the GPTQ kernel applies
        assert (logits(merged) - on_quantized).abs().max().item() < 1e-4
    else:  # the original base differs from its 4-bit copy by the quantization error only
        manifest = json.loads((out / "manifest.json").read_text())
        original = AutoModelForCausalLM.from_pretrained(manifest["base_model"]["path"])
        reference = logits(PeftModel.from_pretrained(original, out).eval())
        assert (logits(merged) - reference).abs().max().item() < 1e-4
        assert 0 < (logits(merged) - on_quantized).abs().max().item() < 1.0


@pytest.mark.parametrize("qlora_run", ["gptq"], indirect=True)  # the round trip starts from the GPTQ base
def test_requantize_round_trip(qlora_run, bases, tmp_path, capsys, monkeypatch):
    from tests.conftest import REPO

    _, _, _, out = qlora_run
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")

    merged, requant = tmp_path / "merged", tmp_path / "requant"
    assert main(["merge", str(out), "--out", str(merged)]) == 0
    assert (
        main(
            [
                "quantize",
                str(merged),
                "--out",
                str(requant),
                "--group-size",
                "32",
                "--samples",
                "16",
                "--calibration",
                str(REPO / "data/example_chatml.jsonl"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "perplexity on" in text and "after 4-bit GPTQ" in text
    config = json.loads((requant / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4
    from qwen_ft.export.dequant import load_gptq_model

    assert torch.isfinite(logits(load_gptq_model(str(requant)))).all()
    assert bases["report"].ppl_after > 0
    # gptqmodel's per-layer logs go with the model, not into the working directory.
    assert list((requant / "quant_logs").glob("*.log")) and not (tmp_path / "cwd" / "logs").exists()


@pytest.mark.parametrize(
    "case, overrides, message",
    [
        ("bnb on gptq", {"backend": "bnb", "path": "gptq"}, "already GPTQ-quantized"),
        ("gptq on dense", {"backend": "gptq", "path": "dense"}, "has no GPTQ quantization_config"),
        ("bits mismatch", {"backend": "gptq", "path": "gptq", "bits": 8}, "set quant.bits=4"),
        ("full on gptq", {"method": "full", "path": "gptq"}, "is a GPTQ checkpoint"),
    ],
)
def test_incompatible_quantized_setups_are_refused(run_config, bases, case, overrides, message):
    cfg = run_config(
        model={"path": str(bases[overrides["path"]])},
        method=overrides.get("method", "qlora"),
        quant={"backend": overrides.get("backend", "bnb"), "bits": overrides.get("bits", 4)},
    )
    with pytest.raises(ConfigError, match=message):
        steps.checked_config(cfg, [])


def test_merge_refuses_quantized_base(qlora_run, bases, tmp_path):
    from qwen_ft.errors import QwenFtError
    from qwen_ft.export.merge import merge_adapter

    _, _, _, out = qlora_run
    with pytest.raises(QwenFtError, match="merging in place into quantized weights is not supported"):
        merge_adapter(str(out), str(tmp_path / "m"), base=str(bases["gptq"]))
    assert not Path(tmp_path / "m").exists()


@pytest.mark.slow
@pytest.mark.extras("deepspeed")
def test_gptq_qlora_under_zero2(bases, run_config, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    out = tmp_path / "gptq-zero2"
    cfg = run_config(model={"path": str(bases["gptq"])}, method="qlora", quant={"backend": "gptq"})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "finetune.py"),
        "--config",
        cfg,
        f"train.output_dir={out}",
        "dist.deepspeed=zero2",
        "train.max_steps=3",
        "train.micro_batch_size=1",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "train_history.json").read_text())
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert json.loads((out / "manifest.json").read_text())["quant"]["backend"] == "gptq"


def test_qlora_frozen_parts_stay_in_compute_dtype(bases, run_config):
    """No fp32 upcast of frozen embeddings/output layer/norms (peft's recipe costs 2.5 GB at 7B)."""
    cfg = steps.checked_config(
        run_config(method="qlora", quant={"backend": "bnb"}, lora={"r": 4, "train_embeddings": True}),
        [f"model.path={bases['dense']}", "model.dtype=bf16"],
    )
    precision, attn, family = steps.runtime(cfg, CPU)
    model = steps.model(cfg, family, precision, attn, CPU)
    params = dict(model.named_parameters())
    frozen = {n: p.dtype for n, p in params.items() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen and set(frozen.values()) == {torch.bfloat16}, frozen
    trained = {p.dtype for p in params.values() if p.requires_grad}
    assert trained == {torch.float32}


@pytest.mark.parametrize("backend", ["bnb", "gptq"])
def test_parameter_count_is_the_logical_size(bases, run_config, backend):
    """Quantized layers count as in x out weights, so the banner's total matches the dense model."""
    from qwen_ft.model.adapters import count_parameters

    path = bases["dense"] if backend == "bnb" else bases["gptq"]
    cfg = steps.checked_config(
        run_config(method="qlora", quant={"backend": backend}, lora={"r": 4}), [f"model.path={path}"]
    )
    precision, attn, family = steps.runtime(cfg, CPU)
    trainable, total = count_parameters(steps.model(cfg, family, precision, attn, CPU))
    dense = steps.checked_config(run_config(lora={"r": 4}), [f"model.path={bases['dense']}"])
    precision, attn, family = steps.runtime(dense, CPU)
    assert (trainable, total) == count_parameters(steps.model(dense, family, precision, attn, CPU))


@pytest.fixture(scope="module")
def moe_qlora(tmp_path_factory):
    """Q-LoRA (bnb) on a tiny Qwen3-MoE: 4 routed experts, top-2."""
    from qwen_ft.model.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("moe-qlora")
    base = make_tiny_model(tmp / "base", "qwen3_moe", hidden=64, layers=2)
    cfg = tmp / "run.yaml"
    write_run_yaml(
        cfg,
        base,
        tmp,
        method="qlora",
        quant={"backend": "bnb"},
        lora={"r": 4, "alpha": 8},
        train={
            "output_dir": str(tmp / "out"),
            "micro_batch_size": 2,
            "grad_accum": 1,
            "learning_rate": 2e-2,
            "max_steps": 4,
        },
    )
    trainer, state = run_training(steps.checked_config(str(cfg), []), CPU)
    return base, trainer, state, tmp / "out"


def test_moe_qlora_has_4bit_routed_experts_and_trains(moe_qlora, capsys):
    _, trainer, state, out = moe_qlora
    params = dict(trainer.unwrapped.named_parameters())
    four_bit = {k.replace(".base_layer", "") for k, p in params.items() if type(p).__name__ == "Params4bit"}
    experts = {
        f"base_model.model.model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
    }
    print("4-bit tensors:", *sorted(four_bit), sep="\n  ")
    assert experts <= four_bit  # the fused routed experts, beside every attention projection
    assert {f"base_model.model.model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"} <= four_bit
    assert not any("mlp.gate." in k or "embed" in k for k in four_bit)  # the router and embeddings stay
    packed = params["base_model.model.model.layers.0.mlp.experts.base_layer.base_layer.gate_up_proj"]
    assert tuple(packed.quant_state.shape) == (4, 2 * 32, 64)  # [E, 2I, H], 4 bits a weight:
    assert packed.numel() * packed.element_size() == 4 * 2 * 32 * 64 // 2
    losses = [h["loss"] for h in state.history if "loss" in h]
    assert losses[-1] < losses[0], losses
    assert any("experts.lora_B" in k and p.abs().sum() > 0 for k, p in params.items())


def test_moe_qlora_equals_stock_peft_on_the_dequantized_experts(moe_qlora):
    """qwen-ft's 4-bit experts (dequantized in the grouped forward and again in the backward) against
    stock peft + transformers with the experts' dequantized values as plain weights: logits and the
    gradient of every adapter tensor; the frozen 4-bit experts are bit-identical to a fresh quantization."""
    import bitsandbytes.functional as bnbf
    from peft import PeftModel

    from qwen_ft.export.merge import adapter_on_quantized_base, quantized_base

    _, trainer, _, out = moe_qlora
    manifest = json.loads((out / "manifest.json").read_text())
    ours = trainer.unwrapped.eval()
    fresh = dict(adapter_on_quantized_base(out, manifest).named_parameters())
    reference = quantized_base(out, manifest)
    for name, p in ours.named_parameters():
        if type(p).__name__ == "Params4bit" and ".experts." in name:
            assert same_bits(p, fresh[name]), name
            plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            reference.get_parameter(plain).data = bnbf.dequantize_4bit(p.data, p.quant_state).float()
    reference = PeftModel.from_pretrained(reference, out, is_trainable=True).eval()
    diff = (logits(ours) - logits(reference)).abs().max().item()
    print(f"max |logit diff| {diff:.3g}")
    assert diff < 1e-5
    labels = PROBE.clone()
    grads = []
    for model in (ours, reference):
        model.zero_grad()
        model(input_ids=PROBE, labels=labels, use_cache=False).loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if "experts" in k and "lora_" in k})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    print(
        "max |grad diff|",
        max((g - grads[1][k]).abs().max().item() for k, g in grads[0].items()),
        "of max |grad|",
        max(g.abs().max().item() for g in grads[0].values()),
    )
    for key, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][key], atol=1e-6, rtol=1e-4), key


def test_moe_qlora_merges_into_the_base_layout(moe_qlora, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwen_ft.model.layout import tensor_files

    base, _, _, out = moe_qlora
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert "merged into original-precision base" in capsys.readouterr().out
    assert tensor_files(tmp_path / "merged").keys() == tensor_files(base).keys()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    assert (logits(merged) - logits(stock)).abs().max().item() < 1e-4


def test_composite_moe_qlora_packs_the_experts_not_the_vision_tower_and_merges(tmp_path, capsys):
    """Qwen3.5/3.6-MoE (configs/qwen3.5-35b-a3b_qlora.yaml): the language model's experts in 4-bit, the
    frozen vision tower untouched, and the merge writes every base tensor (vision and MTP included)."""
    from qwen_ft.model.layout import tensor_files
    from qwen_ft.model.tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "base", "qwen3_5_moe", hidden=32, layers=2)
    cfg = write_run_yaml(
        tmp_path / "run.yaml",
        base,
        tmp_path,
        method="qlora",
        quant={"backend": "bnb"},
        lora={"r": 4, "alpha": 8},
        train={"output_dir": str(tmp_path / "out"), "max_steps": 2, "micro_batch_size": 2, "learning_rate": 2e-2},
    )
    trainer, _ = run_training(steps.checked_config(str(cfg), []), CPU)
    kinds = {k: type(p).__name__ for k, p in trainer.unwrapped.named_parameters()}
    packed = sorted(k for k, kind in kinds.items() if kind == "Params4bit" and ".experts." in k)
    assert [k.rsplit(".", 1)[1] for k in packed] == ["down_proj", "gate_up_proj"] * 2, packed  # 2 layers
    assert not any(kind == "Params4bit" for k, kind in kinds.items() if ".visual." in k)
    assert main(["merge", str(tmp_path / "out"), "--out", str(tmp_path / "merged")]) == 0
    assert "merged into original-precision base" in capsys.readouterr().out
    assert tensor_files(tmp_path / "merged").keys() == tensor_files(base).keys()


def test_moe_qlora_with_the_experts_left_out_of_the_adapter_runs_them_4bit(moe_qlora, tmp_path, capsys):
    """4-bit experts no adapter wraps run through the grouped forward (transformers' own cannot read them)."""
    base = moe_qlora[0]
    cfg = write_run_yaml(
        tmp_path / "run.yaml",
        base,
        tmp_path,
        method="qlora",
        quant={"backend": "bnb"},
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        train={"output_dir": str(tmp_path / "out"), "micro_batch_size": 2, "max_steps": 2},
    )
    trainer, state = run_training(steps.checked_config(cfg, []), CPU)
    assert "the routed experts are NOT adapted" in capsys.readouterr().out
    kinds = [type(p).__name__ for k, p in trainer.unwrapped.named_parameters() if ".experts." in k]
    assert kinds == ["Params4bit"] * 4, kinds
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state.history if "loss" in h)


@pytest.mark.parametrize("backend", ["bnb", "gptq"])
def test_dpo_on_a_quantized_base_starts_at_ln2_and_learns(bases, tmp_path, backend):
    """Q-LoRA preference tuning: the reference is the quantized base with the adapter off, so a fresh adapter's
    first DPO loss is ln 2 on either 4-bit base, and the steps lower it."""
    import json
    import math

    from qwen_ft.cli.main import main
    from tests.conftest import REPO

    config = write_run_yaml(
        tmp_path / "run.yaml",
        bases["dense"] if backend == "bnb" else bases["gptq"],
        tmp_path,
        data={"train_files": [str(REPO / "data/example_dpo.jsonl")]},
        method="qlora",
        objective="dpo",
        quant={"backend": backend},
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        train={"output_dir": str(tmp_path / "out"), "micro_batch_size": 4, "grad_accum": 1, "learning_rate": 2e-2},
    )
    assert main(["train", config, "train.max_steps=3"]) == 0
    history = [h for h in json.loads((tmp_path / "out" / "train_history.json").read_text()) if "loss" in h]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["rewards/margins"] > 0
