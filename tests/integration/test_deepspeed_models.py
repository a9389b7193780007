"""DeepSpeed beyond the tiny dense model's ZeRO matrix (tests/integration/test_deepspeed.py): one process without a
launcher, ZeRO-3 evaluation over ranks of unequal shares, the Qwen3.5 hybrid composite and a mixture of experts under
ZeRO-3. In a file of its own so the two test workers share the DeepSpeed launches (`--dist loadfile`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.integration.conftest import write_run_yaml
from tests.integration.test_deepspeed import COMMON, torchrun, weights

pytestmark = [pytest.mark.extras("deepspeed"), pytest.mark.slow]  # every test launches DeepSpeed processes


def tight_zero3(tmp_path: Path) -> Path:
    """The ZeRO-3 preset forced to gather parameters at every forward (the tiny models would otherwise stay gathered
    between forwards and hide a rank that waits for another)."""
    ds = json.loads((REPO / "configs/deepspeed/zero3.json").read_text())
    ds["zero_optimization"].update(
        stage3_param_persistence_threshold=0,
        stage3_max_live_parameters=0,
        stage3_max_reuse_distance=0,
        stage3_prefetch_bucket_size=0,
    )
    path = tmp_path / "zero3_tight.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_single_process_without_a_launcher(tmp_path, tiny_model_dir, stage):
    """Plain `python finetune.py` with DeepSpeed: a process group of one is made for it."""
    config = write_run_yaml(tmp_path / "run.yaml", tiny_model_dir, tmp_path, lora={"r": 8, "alpha": 16})
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "finetune.py"),
            "--config",
            config,
            f"train.output_dir={tmp_path / 'out'}",
            f"dist.deepspeed={stage}",
            *COMMON,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**env, "DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "done: 4 steps" in proc.stdout and (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_zero3_eval_of_an_odd_size_on_two_processes(tmp_path, tiny_model_dir):
    """3 eval batches over 2 ranks: before, rank 1 ran one forward fewer and rank 0 waited forever in
    ZeRO-3's parameter gathering (forced on every forward here: the tiny model would otherwise stay
    gathered between forwards and hide it)."""
    lines = (REPO / "data/example_chatml.jsonl").read_text().splitlines()[:3]
    (tmp_path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    tight = tight_zero3(tmp_path)
    config = write_run_yaml(
        tmp_path / "run.yaml",
        tiny_model_dir,
        tmp_path,
        lora={"r": 8, "alpha": 16},
        data={"eval_files": [str(tmp_path / "eval.jsonl")], "packing": False},
        train={"eval_steps": 2},
    )
    try:
        torchrun(config, tmp_path / "out", f"dist.deepspeed={tight}", timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("ZeRO-3 evaluation hung: ranks ran different numbers of eval forwards")
    history = json.loads((tmp_path / "out" / "train_history.json").read_text())
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4]


@pytest.fixture(scope="module")
def qwen3_5_runs(tmp_path_factory):
    """The tiny Qwen3.5 composite (bf16 on disk), packed, under DDP and ZeRO-3 on 2 processes."""
    from qwen_ft.model.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("ds35")
    base = make_tiny_model(tmp / "base", "qwen3_5", hidden=32, layers=4, dtype="bf16")
    config = tmp / "run.yaml"
    write_run_yaml(config, base, tmp, lora={"r": 4, "alpha": 8}, train={"warmup_ratio": 0.2, "seed": 5})
    done = {}
    for ds, method in [("none", "lora"), ("zero3", "lora"), ("none", "full"), ("zero3", "full")]:
        out = tmp / f"{ds}-{method}"
        torchrun(str(config), out, f"dist.deepspeed={ds}", f"method={method}")
        done[ds, method] = out
    return base, done


@pytest.mark.parametrize("method", ["lora", "full"])
def test_qwen3_5_under_zero3_equals_ddp_and_keeps_the_base_layout(qwen3_5_runs, method):
    """ZeRO-3 gathers every trained tensor of the hybrid model (GDN layers included) and the saved model
    still carries the vision tower and MTP tensors byte for byte."""
    from tests.integration.test_qwen3_5 import raw_tensors

    base, done = qwen3_5_runs
    ref_dir, got_dir = done["none", method], done["zero3", method]
    if method == "lora":
        ref, got = weights(ref_dir), weights(got_dir)
    else:
        from qwen_ft.model.layout import tensor_files

        def trained(d):
            return {
                k: load_file(str(f))[k]
                for k, f in tensor_files(d).items()
                if not k.startswith(("model.visual.", "mtp."))
            }

        ref, got = trained(ref_dir), trained(got_dir)
        assert raw_tensors(got_dir) == raw_tensors(base)
    assert ref.keys() == got.keys() and any(".linear_attn." in k for k in got)
    worst = max((ref[k].float() - got[k].float()).abs().max().item() for k in ref)
    print(f"qwen3_5 zero3 {method}: max |weight diff| vs DDP reference {worst:.3g}")
    assert worst < 1e-4, worst


def test_moe_under_zero3_with_different_routing_per_rank_finishes_and_equals_zero2(tmp_path):
    """Each rank trains other conversations, so its tokens reach other experts. ZeRO-3 is forced to gather
    parameters at every forward (the tiny model would otherwise stay gathered and hide a hang); losses
    (aux included) must equal ZeRO-2's, which never partitions parameters."""
    from qwen_ft.model.tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "base", "qwen3_moe", hidden=32, layers=2)
    tight = tight_zero3(tmp_path)
    config = write_run_yaml(tmp_path / "run.yaml", base, tmp_path, lora={"r": 4, "alpha": 8})
    histories = {}
    for stage in ("zero2", str(tight)):
        out = tmp_path / Path(stage).stem
        try:
            torchrun(config, out, f"dist.deepspeed={stage}", "train.save_steps=0", "train.max_steps=2")
        except subprocess.TimeoutExpired:
            pytest.fail(f"{stage}: MoE training hung")
        histories[stage] = json.loads((out / "train_history.json").read_text())
    (z2, z3) = histories.values()
    pairs = list(zip(z2, z3, strict=True))
    print("moe zero2 vs zero3 losses", [(a["loss"], b["loss"], a["aux_loss"], b["aux_loss"]) for a, b in pairs])
    for a, b in pairs:
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-5)
