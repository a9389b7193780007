"""What only a GPU can show: bf16/fp16 steps, the varlen kernels against one-by-one references,
bitsandbytes and GPTQ training kernels, single-process DeepSpeed. Run by scripts/gpu_check.sh."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_ft import deps
from qwen_ft.cli.main import main
from qwen_ft.data.collate import collate
from qwen_ft.model.attention import flattens, model_attn_name, torch_varlen_available
from qwen_ft.recipe import steps
from qwen_ft.recipe.run import run_training
from qwen_ft.train.loss import causal_lm_loss
from tests.integration.conftest import write_run_yaml
from tests.integration.test_packing_exact import examples, tiny_model

CUDA = torch.device("cuda") if torch.cuda.is_available() else None


def train(config: str):
    """fit() on the GPU; returns (trainer, state, losses)."""
    trainer, state = run_training(steps.checked_config(config, []), steps.distributed())
    return trainer, state, [h["loss"] for h in state.history if "loss" in h]


def backends_here() -> list[str]:
    names = ["sdpa"]
    if CUDA is not None and torch_varlen_available(CUDA):
        names.append("varlen")
    if deps.usable("flash_attn"):
        names.append("flash_attention_2")
    return names


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_lora_step_in_half_precision(run_config, dtype):
    """bf16 autocast, and fp16 with the GradScaler: finite, falling loss; adapters stay fp32."""
    trainer, _, losses = train(
        run_config(model={"dtype": dtype, "attn_implementation": "auto"}, train={"max_steps": 8})
    )
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    trained = [p for p in trainer.unwrapped.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 and p.is_cuda for p in trained)
    assert trainer.backend.scaler.is_enabled() == (dtype == "fp16")


def grads_of(model, batch):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, n = causal_lm_loss(model, {k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in batch.items()})
    loss.backward()
    return loss.item(), n, torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("rows_per_batch", [1, 2])
@pytest.mark.parametrize("attn", backends_here())
def test_packed_equals_one_by_one(attn, rows_per_batch):
    """A packed micro-batch (flattened for varlen kernels) against each conversation alone, bf16."""
    exs = examples([40, 64, 25, 33, 50, 17], seed=1)
    rows = [exs[:3], exs[3:]][:rows_per_batch]
    ref_model = tiny_model("sdpa").to(CUDA).train()
    model = tiny_model(model_attn_name(attn)).to(CUDA).train()
    model.load_state_dict(ref_model.state_dict())
    loss, n, grads = grads_of(model, collate(rows, 0, packed=True, flat=flattens(attn)))
    ref_loss, ref_n, ref_grads = 0.0, 0, 0
    for ex in [e for row in rows for e in row]:
        one = grads_of(ref_model, collate([[ex]], 0, packed=False))
        ref_loss, ref_n, ref_grads = ref_loss + one[0], ref_n + one[1], ref_grads + one[2]
    assert n == ref_n
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0).item()
    assert cos > 0.999, cos


@pytest.mark.parametrize("rows_per_batch", [1, 2])
@pytest.mark.parametrize("attn", backends_here())
def test_qwen3_5_packed_equals_one_by_one(attn, rows_per_batch):
    """Qwen3.5's hybrid layers on the GPU: qwen-ft's per-conversation GDN layout (through
    flash-linear-attention's kernels where transformers finds them) against each conversation alone, bf16."""
    from qwen_ft.model.linear_attention import install
    from tests.integration.test_gdn_packing import tiny_hybrid

    exs = examples([40, 64, 25, 33, 50, 17], seed=1)
    rows = [exs[:3], exs[3:]][:rows_per_batch]
    ref_model = tiny_hybrid("sdpa").to(CUDA).train()
    model = tiny_hybrid(attn).to(CUDA).train()
    model.load_state_dict(ref_model.state_dict())
    assert install(model) == 3
    loss, n, grads = grads_of(model, collate(rows, 0, packed=True, flat=flattens(attn), segments=True))
    ref_loss, ref_n, ref_grads = 0.0, 0, 0
    for ex in [e for row in rows for e in row]:
        one = grads_of(ref_model, collate([[ex]], 0, packed=False))
        ref_loss, ref_n, ref_grads = ref_loss + one[0], ref_n + one[1], ref_grads + one[2]
    assert n == ref_n
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0).item()
    assert cos > 0.999, cos


@pytest.mark.extras("bitsandbytes")
def test_bnb_qlora_step(run_config):
    _, _, losses = train(
        run_config(
            method="qlora",
            quant={"backend": "bnb"},
            model={"dtype": "bf16"},
            lora={"dropout": 0.0},
            train={"max_steps": 8, "learning_rate": 2e-2},
        )
    )
    assert losses[-1] < losses[0], losses


@pytest.mark.extras("gptqmodel")
def test_gptq_qlora_step_and_merge(tmp_path):
    from qwen_ft.export.quantize import quantize_model
    from qwen_ft.model.tiny import make_tiny_model
    from tests.conftest import REPO

    dense, gptq = make_tiny_model(tmp_path / "dense", hidden=64, layers=1), tmp_path / "gptq"  # as the CPU test
    quantize_model(str(dense), str(gptq), 4, 32, str(REPO / "data/example_chatml.jsonl"), n_calib=16)
    cfg = write_run_yaml(
        tmp_path / "run.yaml",
        gptq,
        tmp_path,
        method="qlora",
        quant={"backend": "gptq"},
        model={"dtype": "bf16"},
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        train={"output_dir": str(tmp_path / "out"), "micro_batch_size": 2, "max_steps": 8, "learning_rate": 2e-2},
    )
    _, _, losses = train(cfg)
    assert losses[-1] < losses[0], losses
    assert main(["merge", str(tmp_path / "out"), "--out", str(tmp_path / "merged")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


@pytest.mark.extras("deepspeed")
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_single_process(run_config, tmp_path, stage):
    """DeepSpeed from plain `python finetune.py` (no launcher): a process group of one is made for it."""
    import subprocess
    import sys

    from tests.conftest import REPO

    config = run_config(model={"dtype": "bf16"}, train={"max_steps": 8})
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "finetune.py"),
            "--config",
            config,
            f"dist.deepspeed={stage}",
            f"train.output_dir={tmp_path / stage}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "done: 8 steps" in proc.stdout


@pytest.mark.extras("liger_kernel")
@pytest.mark.parametrize("kernel", ["auto", "liger", "qwen-ft"])
def test_loss_kernel_choice_trains(run_config, kernel):
    """train.loss_kernel picks the kernel the real loop uses (auto: liger where it imports), and each trains."""
    trainer, _, losses = train(run_config(model={"dtype": "bf16"}, train={"max_steps": 8, "loss_kernel": kernel}))
    assert trainer.loss_fn.liger == (kernel == "liger" or (kernel == "auto" and deps.usable("liger")))
    assert losses[-1] < losses[0], losses


def test_liger_loss_equals_ours():
    """Liger's kernel (used on a GPU when installed) against qwen-ft's fused chunks, bf16 autocast."""
    pytest.importorskip("liger_kernel")
    from qwen_ft.train.loss import fused_linear_cross_entropy, liger_linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(300, 64, device=CUDA, requires_grad=True)
    weight = torch.randn(1000, 64, device=CUDA, requires_grad=True)
    target = torch.randint(0, 1000, (300,), device=CUDA)
    results = []
    for fn in (
        lambda: liger_linear_cross_entropy(hidden, weight, target),
        lambda: fused_linear_cross_entropy(hidden, weight, target, 128),
    ):
        hidden.grad = weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn()
        loss.backward()
        results.append((loss.item(), hidden.grad.clone(), weight.grad.clone()))
    (a, ha, wa), (b, hb, wb) = results
    assert a == pytest.approx(b, rel=1e-2)
    for x, y in ((ha, hb), (wa, wb)):
        assert torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item() > 0.999
