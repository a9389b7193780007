"""DeepSpeed ZeRO-2/3 on CPU (gloo, 2 processes): loss falls, outputs equal a DDP reference, resume, LR.

Each configuration trains 4 steps of the tiny model; DeepSpeed's CPU shared-memory op is compiled
once into the torch extensions cache on first use. The DeepSpeed JSON builder and its refusals are
tested without DeepSpeed in tests/unit/test_ds_config.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen_ft.train.schedule import lr_at
from tests.conftest import REPO, free_port
from tests.integration.conftest import write_run_yaml

pytestmark = [pytest.mark.extras("deepspeed"), pytest.mark.slow]  # every test launches DeepSpeed processes
COMMON = [
    "train.max_steps=4",
    "train.save_steps=2",
    "train.micro_batch_size=1",
    "train.grad_accum=2",
    "lora.dropout=0.0",
    "train.learning_rate=2e-3",
]


def torchrun(config: str, out: Path, *extra: str, timeout: float = 600) -> str:
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
        config,
        f"train.output_dir={out}",
        *COMMON,
        *extra,
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def weights(out: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(out / name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """DDP references and ZeRO runs of the same settings."""
    tmp = tmp_path_factory.mktemp("ds")
    config = tmp / "run.yaml"
    write_run_yaml(config, tiny_model_dir, tmp, lora={"r": 8, "alpha": 16}, train={"warmup_ratio": 0.2, "seed": 5})
    done = {}
    for ds, method in [
        ("none", "full"),
        ("none", "lora"),
        ("zero2", "full"),
        ("zero2", "lora"),
        ("zero3", "full"),
        ("zero3", "lora"),
    ]:
        out = tmp / f"{ds}-{method}"
        done[ds, method] = (out, torchrun(str(config), out, f"dist.deepspeed={ds}", f"method={method}"))
    return str(config), tmp, done


ZERO = [(ds, m) for ds in ("zero2", "zero3") for m in ("full", "lora")]


@pytest.mark.parametrize("ds, method", ZERO)
def test_loss_falls_and_lr_follows_the_yaml_schedule(runs, ds, method):
    _, _, done = runs
    out, _ = done[ds, method]
    history = json.loads((out / "train_history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"]
    warmup = 1  # ceil(0.2 * 4)
    assert [h["lr"] for h in history] == pytest.approx([lr_at(s, 2e-3, 4, warmup, "cosine") for s in range(4)])


@pytest.mark.parametrize("ds, method", ZERO)
def test_saved_outputs_load_and_equal_the_ddp_reference(runs, ds, method):
    _, _, done = runs
    out, _ = done[ds, method]
    ref, got = weights(done["none", method][0]), weights(out)
    assert ref.keys() == got.keys() and all(t.numel() > 0 for t in got.values())  # every tensor gathered
    worst = max((ref[k].float() - got[k].float()).abs().max().item() for k in ref)
    print(f"{ds} {method}: max |weight diff| vs DDP reference {worst:.3g}")
    assert worst < 1e-4, worst
    if method == "full":
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(out).config.use_cache is True
    else:
        from peft import PeftConfig

        assert PeftConfig.from_pretrained(out).peft_type == "LORA"


@pytest.mark.parametrize("ds, method", [("zero3", "lora"), ("zero2", "full")])
def test_resume_from_checkpoint_equals_uninterrupted(runs, ds, method):
    config, tmp, done = runs
    out, _ = done[ds, method]
    resumed = tmp / f"resumed-{ds}-{method}"
    shutil.copytree(out / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    log = torchrun(config, resumed, f"dist.deepspeed={ds}", f"method={method}", "train.resume=auto")
    assert "resume: from" in log and "at step 2" in log
    ref, got = weights(out), weights(resumed)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_lora_with_trainable_embeddings_under_zero3(runs):
    config, tmp, _ = runs
    out = tmp / "zero3-emb"
    torchrun(config, out, "dist.deepspeed=zero3", "method=lora", "lora.train_embeddings=true")
    saved = weights(out)
    assert any("embed_tokens" in k for k in saved) and all(t.numel() > 0 for t in saved.values())


@pytest.mark.extras("bitsandbytes")
@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_bnb_qlora_under_zero(runs, ds):
    config, tmp, _ = runs
    out = tmp / f"{ds}-qlora"
    torchrun(config, out, f"dist.deepspeed={ds}", "method=qlora", "quant.backend=bnb")
    history = json.loads((out / "train_history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(t.numel() > 0 for t in weights(out).values())


def test_data_cache_built_once_for_all_ranks(runs):
    _, tmp, _ = runs
    entries = [p.name for p in (tmp / "cache").iterdir()]
    assert len(entries) == 1 and not entries[0].startswith(".")  # one complete entry, no leftovers
