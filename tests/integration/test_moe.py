"""Mixtures of experts end to end on tiny checkpoints of every MoE family (4 routed experts, top-2, a
shared expert where the family has one; the real vocabularies): LoRA reaches every routed expert
through peft's target_parameters, the adapter loads in stock peft with the same logits, the merge
equals stock peft's base + adapter and writes the base's own per-expert layout, the router loss is
transformers' own, and packed equals unpacked with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qwen_ft.model.families import model_class
from qwen_ft.model.layout import tensor_files
from qwen_ft.recipe import steps
from qwen_ft.recipe.run import run_training
from qwen_ft.train.distributed import DistInfo
from tests.integration.conftest import write_run_yaml

pytestmark = pytest.mark.slow
CPU = DistInfo(0, 1, 0, torch.device("cpu"))
FAMILIES = ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text")
LAYERS = 2  # the hybrid families: one Gated DeltaNet layer, one full-attention layer


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    from qwen_ft.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("moe")
    return {f: make_tiny_model(root / f, f, hidden=32, layers=LAYERS) for f in FAMILIES}


def train(tmp: Path, model_dir: Path, **sections):
    cfg = write_run_yaml(tmp / "run.yaml", model_dir, tmp, **sections)
    return run_training(steps.checked_config(cfg, []), CPU)


def probe(model) -> torch.Tensor:
    ids = torch.tensor([[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]])
    if model.config.get_text_config().vocab_size > 200_000:  # the Qwen3.5 vocabulary
        ids = torch.tensor([[248045, 846, 198, 9707, 248046, 198, 248045, 74455, 198]])
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def shapes(directory: Path) -> dict[str, tuple]:
    out = {}
    for name, f in tensor_files(directory).items():
        with safe_open(str(f), "pt") as fh:
            out[name] = tuple(fh.get_slice(name).get_shape())
    return out


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, bases) -> dict:
    runs = {}
    for family, base in bases.items():
        tmp = tmp_path_factory.mktemp(f"lora_{family}")
        trainer, state = train(
            tmp,
            base,
            method="lora",
            lora={"r": 4, "alpha": 8},
            train={
                "output_dir": str(tmp / "out"),
                "micro_batch_size": 2,
                "grad_accum": 1,
                "learning_rate": 1e-2,
                "max_steps": 2,
            },
        )
        runs[family] = (trainer, state, tmp / "out")
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_every_routed_expert_and_logs_aux_loss(lora_runs, family):
    trainer, state, out = lora_runs[family]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.0  # the default where parameters are adapted
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(config["target_parameters"])
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        names = sorted(fh.keys())
    experts = [n for n in names if ".mlp.experts." in n]
    print(f"{family}: {len(names)} adapter tensors, experts: {experts}")
    # both fused parameters of every MoE layer: A [rank * experts, in] and B [out, rank * experts], with
    # rank 4, or 8 where stock peft gives the fused gate and up projections rank 4 each (its Qwen3-MoE rule)
    assert len(experts) == LAYERS * 2 * 2
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        ranks = sorted({fh.get_slice(n).get_shape()[0 if "lora_A" in n else 1] for n in experts})
    assert ranks in ([4 * 4], [4 * 4, 8 * 4])
    assert not any(".mlp.gate." in n for n in names)  # the router only when asked
    if family != "qwen3_moe":  # the shared expert is an ordinary MLP
        assert any(".shared_expert.down_proj.lora_A" in n for n in names)
    assert all("aux_loss" in h and 0.5 < h["aux_loss"] < 5 for h in state.history if "loss" in h)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_in_stock_peft_and_merge_equal_and_keep_the_base_layout(lora_runs, bases, family, tmp_path):
    from peft import PeftModel

    from qwen_ft.export.merge import merge_adapter

    trainer, _, out = lora_runs[family]
    base = bases[family]
    stock = PeftModel.from_pretrained(model_class(base).from_pretrained(base, dtype=torch.float32), out).eval()
    trainer.unwrapped.eval()
    from qwen_ft.model.experts import install_lora_experts

    grouped = [m for m in trainer.unwrapped.modules() if getattr(m, "_qwen_ft_grouped", False)]
    assert (
        len(grouped) == LAYERS and install_lora_experts(trainer.unwrapped) == LAYERS
    )  # every MoE layer, wrapped once
    reference = probe(stock)
    assert (probe(trainer.unwrapped) - reference).abs().max().item() <= 1e-5  # qwen-ft's grouped path
    with stock.disable_adapter():
        assert (probe(stock) - reference).abs().max().item() > 1e-4  # the adapter does something
    merge_adapter(str(out), str(tmp_path / "merged"), dtype="fp32")
    merged = model_class(base).from_pretrained(tmp_path / "merged").eval()
    diff = (probe(merged) - reference).abs().max().item()
    print(f"{family}: merged vs stock peft base + adapter {diff:.3g}")
    assert diff <= 1e-4
    assert shapes(tmp_path / "merged") == shapes(base)  # per-expert names and shapes, mtp/vision included
    assert any(".mlp.experts.3.gate_proj.weight" in n for n in shapes(base))


def batches(tok, n: int = 3):
    """The same conversations collated unpacked (padded rows) and packed (one row)."""
    from qwen_ft.data.collate import collate

    examples = []
    for i in range(n):
        ids = tok.encode(f"conversation {i}: " + "word " * (5 + 4 * i))
        examples.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return collate([[e] for e in examples], 0, packed=False), collate([examples], 0, packed=True, segments=True)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_next"])
def test_router_loss_is_transformers_own_and_packed_equals_unpacked(bases, family):
    from qwen_ft.model.build import keep_packed_apart
    from qwen_ft.model.families import resolve_family
    from qwen_ft.tokenizer import load_tokenizer
    from qwen_ft.train.loss import causal_lm_loss
    from qwen_ft.train.router import RouterLoss

    base = bases[family]
    model = model_class(base).from_pretrained(base, dtype=torch.float32)
    keep_packed_apart(model, resolve_family("auto", base), True)
    router = RouterLoss(model, 0.01)
    unpacked, packed = batches(load_tokenizer(base))
    own = model(
        input_ids=unpacked["input_ids"],
        attention_mask=unpacked["attention_mask"],
        output_router_logits=True,
        use_cache=False,
    ).aux_loss
    results = []
    for batch in (unpacked, packed):
        model.zero_grad()
        with router.capturing():
            loss_sum, n = causal_lm_loss(model, batch)
        aux = router.loss(batch)
        (loss_sum + router.coef * aux * n).backward()
        results.append(
            (loss_sum.item(), aux.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
        )
    print(f"{family}: aux unpacked {results[0][1]:.6f} packed {results[1][1]:.6f} transformers {own.item():.6f}")
    assert abs(results[0][1] - own.item()) <= 1e-6
    assert abs(results[1][1] - results[0][1]) <= 1e-5
    assert abs(results[1][0] - results[0][0]) <= 1e-4 * abs(results[0][0])
    assert len(results[0][2]) == len(results[1][2])
    for a, b in zip(results[0][2], results[1][2], strict=True):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, a.abs().max().item())


def test_router_loss_gradient_reaches_the_router(bases):
    """The aux term is trained: with the language-model loss off, the router still gets a gradient."""
    from qwen_ft.tokenizer import load_tokenizer
    from qwen_ft.train.loss import causal_lm_loss
    from qwen_ft.train.router import RouterLoss

    base = bases["qwen3_moe"]
    model = model_class(base).from_pretrained(base, dtype=torch.float32)
    router = RouterLoss(model, 0.01)
    unpacked, _ = batches(load_tokenizer(base))
    with router.capturing():
        causal_lm_loss(model, unpacked)
    router.loss(unpacked).backward()
    gate = model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().max().item() > 0


def test_full_finetune_saves_the_base_layout(tmp_path, bases):
    base = bases["qwen3_moe"]
    trainer, state = train(
        tmp_path,
        base,
        method="full",
        train={
            "output_dir": str(tmp_path / "out"),
            "micro_batch_size": 2,
            "max_steps": 1,
            "router_aux_loss_coef": 0.0,
        },
    )
    out = Path(trainer.train.output_dir)
    assert shapes(out) == shapes(base)
    assert "aux_loss" not in state.history[-1]  # switched off
    saved = model_class(out).from_pretrained(out).eval()
    trainer.unwrapped.eval()
    assert torch.equal(probe(saved), probe(trainer.unwrapped))


def problems(base: Path, *overrides: str) -> list[str]:
    from qwen_ft.config.load import config_from_dict
    from qwen_ft.recipe.preflight import method_problems

    return method_problems(config_from_dict({}, [f"model.path={base}", "data.train_files=[x.jsonl]", *overrides]))


def test_bad_expert_targets_are_refused_naming_the_fix(bases, tiny_model_dir):
    base = bases["qwen3_moe"]
    (err,) = problems(base, "lora.target_modules=[q_proj,experts.gate_up]")
    assert "'experts.gate_up' names no expert parameter" in err
    assert "mlp.experts.down_proj, mlp.experts.gate_up_proj, mlp.gate.weight" in err
    (err,) = problems(base, "lora.target_modules=[q_proj,mlp.experts.down_proj]", "lora.dropout=0.1")
    assert "lora.dropout: 0.1" in err and "target_parameters" in err and "set lora.dropout: 0" in err
    (err,) = problems(base, "lora.target_modules=[gate]")
    assert "name it mlp.gate.weight" in err
    (err,) = problems(tiny_model_dir, "lora.target_modules=[mlp.experts.down_proj]")
    assert "is not a mixture of experts" in err
    assert problems(base, "lora.target_modules=[q_proj,mlp.gate.weight]") == []
    assert problems(base, "lora.target_modules=[q_proj]") == []  # experts left out: allowed, and said


def test_experts_left_out_are_said_once(tmp_path, bases, capsys):
    train(
        tmp_path,
        bases["qwen3_moe"],
        method="lora",
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        train={"output_dir": str(tmp_path / "out"), "micro_batch_size": 2, "max_steps": 1},
    )
    out = capsys.readouterr().out
    assert out.count("the routed experts are NOT adapted") == 1
    assert "experts: run through grouped_mm" in out


def test_gptq_moe_without_per_expert_quantized_experts_is_refused_and_bnb_moe_is_not(bases, tmp_path):
    """bitsandbytes Q-LoRA quantizes the fused experts (tests/integration/test_qlora.py); a GPTQ MoE base
    must hold every expert as GPTQ-quantized linears (tests/integration/test_gptq_moe.py), and one whose
    experts are plain weights is refused naming what it holds."""
    import shutil

    assert problems(bases["qwen3_moe"], "method=qlora", "quant.backend=bnb") == []
    (err,) = problems(bases["qwen3_moe"], "method=qlora", "quant.backend=bnb", "dist.deepspeed=zero3")
    assert "ZeRO-3 partitions the fused experts while loading" in err and "use dist.deepspeed=zero2" in err
    gptq = tmp_path / "gptq"
    shutil.copytree(bases["qwen3_moe"], gptq)
    config = json.loads((gptq / "config.json").read_text())
    (gptq / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    )
    errs = problems(gptq, "method=qlora", "quant.backend=gptq")
    (err,) = [e for e in errs if "experts" in e]
    assert "the routed experts of model.layers.0.mlp.experts are not quantized per expert" in err, err
    assert "(model.layers.0.mlp.experts.0.gate_proj.qweight is absent; found " in err
    assert "model.layers.0.mlp.experts.0.down_proj.weight" in err


@pytest.mark.parametrize("rows", [[[0, 1, 2]], [[0, 1, 2], [3, 4]]], ids=["mb1", "mb2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_step_equals_one_conversation_at_a_time(bases, family, rows):
    """The language-model loss and every gradient, packed (GDN layers restarted per conversation) vs each
    conversation alone. (The router loss is a statistic of the whole micro-batch, not a sum over
    conversations: its packed = unpacked check is above.)"""
    from qwen_ft.data.collate import collate
    from qwen_ft.model.build import keep_packed_apart
    from qwen_ft.model.families import resolve_family
    from qwen_ft.train.loss import causal_lm_loss
    from tests.integration.test_packing_exact import examples

    base = bases[family]
    model = model_class(base).from_pretrained(base, dtype=torch.float32).train()
    keep_packed_apart(model, resolve_family("auto", base), True)
    exs = examples([7, 12, 5, 9, 3], seed=1)
    loss, n = causal_lm_loss(model, collate([[exs[i] for i in r] for r in rows], 0, packed=True, segments=True))
    loss.backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref_loss, ref_n = torch.zeros(()), 0
    for i in sorted(i for r in rows for i in r):
        part, k = causal_lm_loss(model, collate([[exs[i]]], 0, packed=False))
        part.backward()
        ref_loss, ref_n = ref_loss + part.detach(), ref_n + k
    assert n == ref_n
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, ref_loss.item())
    ref = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert packed.keys() == ref.keys() and any(".mlp.experts." in k for k in ref)
    # relative to each gradient's size: the tied 151k/248k-row embedding's gradient (up to ~5 here) sums
    # the padded second row in another order (a leak between conversations is ~1e-2, test_gdn_packing.py)
    worst = max((packed[k] - ref[k]).abs().max().item() / max(1.0, ref[k].abs().max().item()) for k in ref)
    print(
        f"{family} {len(rows)} rows: packed vs one by one, loss {loss.item():.6f} vs {ref_loss.item():.6f}, "
        f"worst relative gradient difference {worst:.2g}"
    )
    assert worst < 2e-5, worst


@pytest.mark.parametrize("objective, data", [("kto", "example_kto.jsonl"), ("dpo", "example_dpo.jsonl")])
def test_preference_objectives_add_the_router_loss_of_the_policy_pass_only(tmp_path, bases, objective, data):
    """A preference step runs the routers several times (the policy, and without gradients the reference
    and KTO's KL sequences); the load-balancing loss is the policy pass's, so the step trains and logs it."""
    from tests.conftest import REPO

    trainer, state = train(
        tmp_path,
        bases["qwen3_moe"],
        data={"train_files": [str(REPO / "data" / data)]},
        objective=objective,
        lora={"r": 4, "alpha": 8},
        train={"output_dir": str(tmp_path / "out"), "micro_batch_size": 4, "grad_accum": 1, "max_steps": 2},
    )
    first = state.history[0]
    assert first["aux_loss"] > 0 and "rewards/chosen" in first
    if objective == "dpo":  # a fresh adapter: the policy is the reference
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
