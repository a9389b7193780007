"""Q-LoRA on a GPTQ mixture of experts (tiny Qwen3-MoE, 4 routed experts, top-2, quantized by gptqmodel to
4 bits, group size 32): the per-expert quantized linears stacked as the fused experts (model/gptq_experts.py),
dequantized exactly as gptqmodel's own loader does, trained through qwen-ft's grouped forward with the same
logits and gradients as stock peft on those weights, and merged into the dequantized base (or the original
one) in the base's own per-expert layout.

The GPTQ checkpoint is made, and read back through gptqmodel's loader, in a spawned process: gptqmodel
patches transformers' MoE classes process-wide (per-expert modules) when it loads an MoE.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen_ft.cli.main import main
from qwen_ft.errors import ConfigError
from qwen_ft.model.layout import tensor_files
from qwen_ft.recipe import steps
from qwen_ft.recipe.run import run_training
from qwen_ft.train.distributed import DistInfo
from tests.integration.conftest import write_run_yaml

pytestmark = [pytest.mark.extras("gptqmodel"), pytest.mark.slow]
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
CPU = DistInfo(0, 1, 0, torch.device("cpu"))
PROBE = torch.tensor([[151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]])


def _make_and_read_back(root: str) -> dict:
    """In a fresh process: a tiny Qwen3-MoE (4-bit) and Qwen2-MoE (8-bit; its shared expert is quantized, its
    one-output shared_expert_gate is not), their GPTQ quantizations (perplexity before and after), and for
    each the largest difference between qwen-ft's stacked dequantization of every expert and gptqmodel's
    own per-expert modules (`dequantize_weight`, the weights its loader's kernel applies)."""
    from qwen_ft.export.quantize import quantize_model
    from qwen_ft.model.tiny import make_tiny_model
    from tests.conftest import REPO

    made = {}
    for family, bits in (("qwen3_moe", 4), ("qwen2_moe", 8)):
        base = make_tiny_model(Path(root) / family, family, hidden=64, layers=1)
        gptq = f"{root}/{family}-gptq"
        report = quantize_model(str(base), gptq, bits, 32, str(REPO / "data/example_chatml.jsonl"), n_calib=8)
        made[family] = {
            "base": str(base),
            "gptq": gptq,
            "ppl": (report.ppl_before, report.ppl_after),
            "dequant_diff": _against_gptqmodel(gptq),
        }
    return {**made["qwen3_moe"], "qwen2_moe": made["qwen2_moe"]}


def _against_gptqmodel(gptq: str) -> dict[str, float]:
    from gptqmodel import GPTQModel

    from qwen_ft.export.dequant import dense_weight
    from qwen_ft.model.gptq_experts import stacked
    from qwen_ft.model.quant import gptq_settings

    ours = stacked(gptq, "model.layers.0.mlp.experts", 4, gptq_settings(gptq) or {}, torch.float32)
    theirs = GPTQModel.load(gptq, device="cpu", backend="torch", dtype=torch.float16)  # the scales as stored
    theirs = theirs.model.model.layers[0].mlp.experts
    reference = {
        "gate_up_proj": torch.stack([torch.cat([dense_weight(e.gate_proj), dense_weight(e.up_proj)]) for e in theirs]),
        "down_proj": torch.stack([dense_weight(e.down_proj) for e in theirs]),
    }
    return {k: (ours[k].dequantize(torch.float32) - reference[k].float()).abs().max().item() for k in ours}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gptq-moe")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_make_and_read_back, (str(root),))


@pytest.fixture(scope="module")
def trained(made, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gptq-moe-run")
    cfg = write_run_yaml(
        tmp / "run.yaml",
        made["gptq"],
        tmp,
        method="qlora",
        quant={"backend": "gptq"},
        lora={"r": 4, "alpha": 8},
        train={"output_dir": str(tmp / "out"), "micro_batch_size": 2, "learning_rate": 2e-2, "max_steps": 4},
    )
    trainer, state = run_training(steps.checked_config(cfg, []), CPU)
    return trainer, state, tmp / "out"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE, use_cache=False).logits.float()


def test_stacked_experts_dequantize_as_gptqmodels_loader_and_requantize_is_measured(made):
    for name, found in (("qwen3_moe 4-bit", made), ("qwen2_moe 8-bit", made["qwen2_moe"])):
        print(
            name,
            "qwen-ft vs gptqmodel dequantized experts, max |diff|:",
            found["dequant_diff"],
            "ppl before/after",
            found["ppl"],
        )
        assert found["dequant_diff"] == {"gate_up_proj": 0.0, "down_proj": 0.0}
        before, after = found["ppl"]
        assert abs(after / before - 1) < 0.05


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_dequantized_experts_are_the_bases_own_in_transformers_layout(made, family):
    """The fused experts dequantized from the per-expert GPTQ linears are the base's experts up to 4-bit
    rounding (gate before up, as transformers fuses them: swapped or random experts would be off by ~1.4),
    and a linear gptqmodel left in full precision is loaded as it is."""
    from transformers import AutoModelForCausalLM

    from qwen_ft.export.dequant import dequantize_to_dense

    found = made if family == "qwen3_moe" else made["qwen2_moe"]
    base, gptq = found["base"], found["gptq"]
    ours, theirs = dequantize_to_dense(gptq).model.layers[0].mlp, AutoModelForCausalLM.from_pretrained(base)
    theirs = theirs.model.layers[0].mlp
    for name in ("gate_up_proj", "down_proj"):
        q, w = getattr(ours.experts, name), getattr(theirs.experts, name)
        error = ((q - w).norm() / w.norm()).item()
        print(family, name, f"relative error {error:.3g}")
        assert error < 0.2, (name, error)
    if family == "qwen2_moe":  # kept in full precision by gptqmodel, loaded as stored
        with safe_open(str(Path(gptq) / "model.safetensors"), "pt") as stored:
            gate = stored.get_tensor("model.layers.0.mlp.shared_expert_gate.weight")
        assert torch.equal(ours.shared_expert_gate.weight, gate.float())


def test_gptq_moe_qlora_trains_lora_on_the_quantized_experts(trained, capsys):
    trainer, state, out = trained
    packed = {
        n.replace(".base_layer", ""): tuple(m.shape)
        for n, m in trainer.unwrapped.named_modules()
        if type(m).__name__ == "GPTQPacked"
    }
    print("GPTQ experts:", packed)
    assert packed == {
        "base_model.model.model.layers.0.mlp.experts.gate_up_proj": (4, 64, 64),
        "base_model.model.model.layers.0.mlp.experts.down_proj": (4, 64, 32),
    }
    params = dict(trainer.unwrapped.named_parameters())
    assert all("lora_" in k for k in params if ".experts." in k)  # the experts are buffers, packed
    adapters = sorted(k for k in params if "experts" in k and "lora_" in k)
    assert len(adapters) == 4 and all(params[k].requires_grad for k in adapters), adapters
    losses = [h["loss"] for h in state.history if "loss" in h]
    assert losses[-1] < losses[0], losses


def test_gptq_moe_trains_with_the_experts_left_out_of_the_adapter(made, tmp_path, capsys):
    """Experts no adapter wraps still run (packed, through the grouped forward); Qwen2-MoE's 8-bit base."""
    base = made["qwen2_moe"]["gptq"]
    cfg = write_run_yaml(
        tmp_path / "run.yaml",
        base,
        tmp_path,
        method="qlora",
        quant={"backend": "gptq", "bits": 8},
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        train={"output_dir": str(tmp_path / "out"), "micro_batch_size": 2, "max_steps": 2},
    )
    trainer, state = run_training(steps.checked_config(cfg, []), CPU)
    assert "the routed experts are NOT adapted" in capsys.readouterr().out
    assert sum(type(m).__name__ == "GPTQPacked" for m in trainer.unwrapped.modules()) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state.history if "loss" in h)


def test_gptq_moe_adapter_equals_stock_peft_on_the_dequantized_base(trained, made):
    """qwen-ft's GPTQ experts (dequantized in the grouped forward and again in the backward) against stock
    peft on the GPTQ base as transformers loads it with the experts dequantized: logits and every gradient
    of the expert adapters."""
    from peft import PeftModel

    from qwen_ft.export.dequant import load_gptq_model

    trainer, _, out = trained
    ours = trainer.unwrapped.eval()
    reference = PeftModel.from_pretrained(load_gptq_model(made["gptq"]), out, is_trainable=True).eval()
    diff = (logits(ours) - logits(reference)).abs().max().item()
    grads = []
    for model in (ours, reference):
        model.zero_grad()
        model(input_ids=PROBE, labels=PROBE, use_cache=False).loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if "experts" in k and "lora_" in k})
    grad_diff = max((g - grads[1][k]).abs().max().item() for k, g in grads[0].items())
    print(
        f"max |logit diff| {diff:.3g}; max |expert adapter grad diff| {grad_diff:.3g} of max |grad| "
        f"{max(g.abs().max().item() for g in grads[0].values()):.3g}"
    )
    assert diff < 1e-5
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for key, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][key], atol=1e-6, rtol=1e-4), key


def test_gptq_moe_merges_by_dequantization_in_the_base_layout(trained, made, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwen_ft.export.dequant import dequantize_to_dense

    _, _, out = trained
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr().out
    assert "merged into dequantized GPTQ weights" in printed and "vs adapter on the quantized base" in printed
    assert tensor_files(tmp_path / "merged").keys() == tensor_files(made["base"]).keys()  # per-expert, as the base
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    stock = PeftModel.from_pretrained(dequantize_to_dense(made["gptq"]), out).eval()
    diff = (logits(merged) - logits(stock)).abs().max().item()
    print(f"merged vs stock peft on the dequantized base: max |logit diff| {diff:.3g}")
    assert diff < 1e-4
    assert main(["merge", str(out), "--out", str(tmp_path / "into-original"), "--base", made["base"]]) == 0
    assert "merged into --base" in capsys.readouterr().out


def test_gptq_moe_whose_experts_are_not_quantized_per_expert_is_refused(made, tmp_path):
    """gptqmodel's `dynamic` rules can leave the experts unquantized: such a checkpoint's experts are
    per-expert full-precision weights, refused naming what was found."""
    gptq, base = Path(made["gptq"]), Path(made["base"])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in gptq.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (mixed / f.name).write_bytes(f.read_bytes())
    with safe_open(str(gptq / "model.safetensors"), "pt") as q, safe_open(str(base / "model.safetensors"), "pt") as d:
        state = {k: q.get_tensor(k) for k in q.keys() if ".experts." not in k}
        state.update({k: d.get_tensor(k) for k in d.keys() if ".experts." in k})
    save_file(state, str(mixed / "model.safetensors"), metadata={"format": "pt"})
    cfg = write_run_yaml(
        tmp_path / "run.yaml",
        mixed,
        tmp_path,
        method="qlora",
        quant={"backend": "gptq"},
        train={"output_dir": str(tmp_path / "out"), "max_steps": 1},
    )
    with pytest.raises(ConfigError) as refused:
        steps.checked_config(cfg, [])
    message = str(refused.value)
    print(message)
    assert "routed experts of model.layers.0.mlp.experts are not quantized per expert" in message
    assert "model.layers.0.mlp.experts.0.gate_proj.qweight is absent" in message
    assert "found model.layers.0.mlp.experts.0.down_proj.weight" in message
    assert json.loads((mixed / "config.json").read_text())["quantization_config"]["bits"] == 4
