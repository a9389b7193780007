"""Training on CPU with a tiny model: LoRA and full, reload, merge, schedule, eval, guard, refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_ft.cli.train import main as finetune_main
from qwen_ft.errors import ConfigError, QwenFtError
from qwen_ft.recipe import steps
from qwen_ft.recipe.run import run_training
from qwen_ft.train.distributed import DistInfo
from qwen_ft.train.feed import GroupFeed
from qwen_ft.train.schedule import lr_at
from tests.integration.conftest import write_run_yaml

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def probe_logits(model, ids=None):
    ids = ids if ids is not None else torch.tensor([[151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def train_in_process(config: str, overrides=()):
    return run_training(steps.checked_config(config, list(overrides)), CPU)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """One LoRA run shared by several checks (eval held out, checkpoints on)."""
    tmp = tmp_path_factory.mktemp("lora")
    cfg = tmp / "run.yaml"
    write_run_yaml(
        cfg,
        tiny_model_dir,
        tmp,
        data={"eval_fraction": 0.1},
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "train_embeddings": True},
        train={
            "output_dir": str(tmp / "out"),
            "micro_batch_size": 2,
            "grad_accum": 2,
            "learning_rate": 1e-2,
            "max_steps": 12,
            "warmup_ratio": 0.2,
            "eval_steps": 6,
            "save_steps": 4,
            "save_total_limit": 2,
        },
    )
    trainer, state = train_in_process(str(cfg))
    return trainer, state, tmp / "out"


def test_lora_loss_falls_and_outputs_describe_themselves(lora_run):
    _, state, out = lora_run
    losses = [h["loss"] for h in state.history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < losses[0] - 1.0
    assert [h["step"] for h in state.history if "eval_loss" in h] == [6, 12]
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "run_config.yaml",
        "manifest.json",
        "tokenizer.json",
        "loss.png",
        "train_history.json",
    ):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["family"] == "qwen3" and manifest["method"] == "lora" and manifest["base_model"]["fingerprint"]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["checkpoint-4", "checkpoint-8"]


def test_lora_leaves_base_frozen_and_changes_adapter(lora_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    trainer, _, _ = lora_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = trainer.unwrapped.get_base_model().state_dict()
    frozen = [k for k in trained if "lora_" not in k and "modules_to_save" not in k and "original_module" not in k]
    for key in frozen:
        plain = key.replace(".base_layer", "")
        assert torch.equal(trained[key], base[plain]), key
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # initialised at zero, so they trained


def test_lr_per_step_equals_schedule(lora_run):
    trainer, state, _ = lora_run
    plan = trainer.plan
    for h in state.history:
        if "lr" in h:
            assert h["lr"] == pytest.approx(lr_at(h["step"] - 1, 1e-2, plan.total_steps, plan.warmup_steps, "cosine"))


def test_save_then_reload_gives_identical_logits(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, _, out = lora_run
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    trainer.unwrapped.eval()
    assert torch.equal(probe_logits(reloaded), probe_logits(trainer.unwrapped))


def test_merge_equivalence_and_stock_loading(lora_run, tmp_path, capsys):
    from qwen_ft.cli.main import main

    trainer, _, out = lora_run
    merged = tmp_path / "merged"
    assert main(["merge", str(out), "--out", str(merged)]) == 0
    text = capsys.readouterr().out
    assert "merge check: max |logit diff| merged vs base+adapter" in text
    code = (
        "import sys, json, torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r}).eval(); "
        "ids = torch.tensor([[151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]]); "
        "print(json.dumps(m(input_ids=ids).logits.tolist())); assert 'qwen_ft' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    stock = torch.tensor(json.loads(proc.stdout))
    trainer.unwrapped.eval()
    assert (stock - probe_logits(trainer.unwrapped)).abs().max().item() < 1e-4
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643
    assert (merged / "tokenizer.json").is_file() and json.loads((merged / "config.json").read_text())["use_cache"]


def test_merge_refuses_full_model_and_missing_base(lora_run, tmp_path, tiny_model_dir):
    from qwen_ft.export.merge import merge_adapter

    with pytest.raises(QwenFtError, match="nothing to merge"):
        merge_adapter(str(tiny_model_dir), str(tmp_path / "x"))
    _, _, out = lora_run
    manifest = json.loads((out / "manifest.json").read_text())
    broken = tmp_path / "adapter"
    broken.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    manifest["base_model"]["path"] = str(tmp_path / "gone")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(QwenFtError, match="pass --base DIR"):
        merge_adapter(str(broken), str(tmp_path / "y"))


def test_full_finetune_saves_loadable_model(run_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    trainer, state = train_in_process(run_config(method="full", train={"learning_rate": 2e-3}))
    losses = [h["loss"] for h in state.history]
    assert losses[-1] < losses[0]
    out = Path(trainer.train.output_dir)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    trainer.unwrapped.eval()
    assert torch.equal(probe_logits(model), probe_logits(trainer.unwrapped))
    assert not torch.equal(probe_logits(model), probe_logits(base))
    assert model.config.use_cache is True


def test_non_finite_guard_stops_with_last_good_checkpoint(run_config, capsys):
    cfg = run_config(method="full", train={"learning_rate": 1e6, "max_grad_norm": 0.0, "max_steps": 10})
    assert finetune_main(["--config", cfg]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "stopped without applying it" in err and "Traceback" not in err
    saved = Path(err.split("saved in ")[1].split(".")[0].strip())
    assert (saved / "trainer_state.json").is_file() and (saved / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "override, message",
    [
        ("quant.bits=8", "quant.bits: 8 with quant.backend=bnb"),
        ("model.dtype=fp16", "model.dtype=fp16 on CPU"),
        ("model.family=qwen2", "set model.family: qwen3"),
    ],
)
def test_refusals(run_config, override, message, capsys):
    extra = ["method=qlora"] if override.startswith("quant.") else []
    assert finetune_main(["--config", run_config(), override, *extra]) == 1
    assert message in capsys.readouterr().err


def test_qwen_v1_with_pickle_weights_is_refused(run_config, tmp_path, capsys):
    import shutil

    from qwen_ft.tokenizer.bundled import bundled_files

    v1 = tmp_path / "qwen-v1"
    v1.mkdir()
    (v1 / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen",
                "architectures": ["QWenLMHeadModel"],
                "vocab_size": 151936,
                "hidden_size": 32,
                "num_attention_heads": 4,
                "num_hidden_layers": 1,
                "intermediate_size": 96,
            }
        )
    )
    (v1 / "pytorch_model.bin").write_bytes(b"not unpickled")
    shutil.copyfile(bundled_files("qwen")[0], v1 / "qwen.tiktoken")
    assert finetune_main(["--config", run_config(), f"model.path={v1}"]) == 1
    err = capsys.readouterr().err
    assert "holds only pickle weights (pytorch_model.bin)" in err and "model.allow_pickle_weights: true" in err
    assert "Traceback" not in err


def test_resume_refuses_other_data_or_settings(lora_run, run_config, tmp_path):
    _, _, out = lora_run
    ckpt = f"train.resume={out}/checkpoints/checkpoint-8"
    # the checkpoint's run_config.yaml is compared first: every changed key is listed
    with pytest.raises(QwenFtError, match=r"(?s)belongs to a run with other settings.*data.max_length: 128 -> 96"):
        run_training(steps.checked_config(run_config(), [ckpt, "data.max_length=96"]), CPU)
    with pytest.raises(QwenFtError, match="lora.train_embeddings: True -> False"):
        run_training(steps.checked_config(run_config(), [ckpt]), CPU)  # same data, but no trainable embeddings
    with pytest.raises(ConfigError):
        steps.checked_config(run_config(), ["train.max_stepz=3"])


@pytest.mark.parametrize("option, flag", [("lora.rslora=true", "use_rslora"), ("lora.dora=true", "use_dora")])
def test_lora_variants_train_and_save(run_config, option, flag):
    trainer, state = train_in_process(run_config(), [option, "train.max_steps=2"])
    config = json.loads((Path(trainer.train.output_dir) / "adapter_config.json").read_text())
    assert config[flag] is True and all(math.isfinite(h["loss"]) for h in state.history)


def test_launcher_prints_and_runs_torchrun(run_config):
    from tests.conftest import REPO

    proc = subprocess.run(
        ["bash", str(REPO / "scripts/train.sh"), run_config(), "train.max_steps=2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("+ torchrun --standalone --nproc_per_node 1 finetune.py --config ")
    assert "done: 2 steps" in proc.stdout


def test_merge_above_tolerance_fails_and_writes_nothing(lora_run, tmp_path, monkeypatch):
    import qwen_ft.export.merge as merge

    _, _, out = lora_run
    monkeypatch.setattr(merge, "TOLERANCE", {k: 0.0 for k in merge.TOLERANCE})
    with pytest.raises(QwenFtError, match="merge check failed"):
        merge.merge_adapter(str(out), str(tmp_path / "m"), dtype="bf16")
    assert not (tmp_path / "m").exists()


def test_lora_emb_on_a_bf16_base_trains_fp32_copies(run_config):
    """peft copies modules_to_save in the base's dtype; bf16 AdamW updates would mostly round away."""
    trainer, state = train_in_process(
        run_config(), ["model.dtype=bf16", "lora.train_embeddings=true", "train.max_steps=2"]
    )
    params = dict(trainer.unwrapped.named_parameters())
    trained = {n: p.dtype for n, p in params.items() if p.requires_grad}
    assert any("modules_to_save" in n for n in trained) and set(trained.values()) == {torch.float32}
    frozen = {p.dtype for n, p in params.items() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and all(math.isfinite(h["loss"]) for h in state.history)


def test_prefetched_groups_train_exactly_as_groups_collated_in_place(run_config, monkeypatch):
    """Every step after the first trains on a group the feed collated ahead; the losses equal a run
    whose groups are all collated in place."""
    feeds = []
    monkeypatch.setattr(GroupFeed, "__enter__", lambda self: feeds.append(self) or self)
    _, ahead = train_in_process(run_config(train={"max_steps": 4}))
    assert (feeds[0].prepared, feeds[0].used) == (3, 3)
    monkeypatch.setattr(GroupFeed, "prepare", lambda self, group: None)
    _, in_place = train_in_process(run_config(train={"max_steps": 4, "overwrite_output_dir": True}))
    assert feeds[1].used == 0
    assert [h["loss"] for h in ahead.history] == [h["loss"] for h in in_place.history]


def test_built_trainer_is_in_training_mode(run_config):
    """from_pretrained returns eval mode, where transformers skips gradient checkpointing and dropout;
    scripts/profile_step.py runs steps straight from build_run, so it must train."""
    from qwen_ft.recipe.run import build_run

    tr, _ = build_run(steps.checked_config(run_config(), []), CPU)
    assert tr.backend.module.training and all(m.training for m in tr.unwrapped.modules())
