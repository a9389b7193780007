"""Preference tuning against TRL 1.16 as the oracle: the same tiny model, data, LoRA initialisation and
optimiser settings give the same losses and metrics at steps 1 and 2 (step 2 follows a real update, so
it checks the gradients too), packed or not; a fresh adapter's first DPO loss is ln 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.integration.conftest import write_run_yaml

pytestmark = pytest.mark.extras("trl")
SEED, PAIRS, LR = 7, 4, 1e-2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """The first pairs of the bundled example (explicit conversational prompts: TRL reads one form per file)."""
    rows = (REPO / "data" / "example_dpo.jsonl").read_text().splitlines()
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(rows[:PAIRS]) + "\n")
    return path


def qwen_ft_history(tmp_path, model_dir, data: Path, objective: str, packing: bool, **preference) -> list[dict]:
    from qwen_ft.cli.main import main

    out = tmp_path / f"out-{packing}"
    config = write_run_yaml(
        tmp_path / "run.yaml",
        model_dir,
        tmp_path,
        data={"train_files": [str(data)], "packing": packing, "default_system": ""},
        method="lora",
        objective=objective,
        preference=preference,
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        train={
            "output_dir": str(out),
            "micro_batch_size": PAIRS,
            "grad_accum": 1,
            "learning_rate": LR,
            "max_steps": 2,
            "warmup_ratio": 0.0,
            "scheduler": "constant",
            "weight_decay": 0.0,
            "adam_beta2": 0.999,
            "seed": SEED,
        },
    )
    assert main(["train", config]) == 0
    return [h for h in json.loads((out / "train_history.json").read_text()) if "loss" in h]


def trl_history(tmp_path, model_dir, data: Path, loss_type: str, **kwargs) -> list[dict]:
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=PAIRS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_steps=2,
        logging_steps=1,
        weight_decay=0.0,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        seed=SEED,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        max_length=None,
        loss_type=[loss_type],
        **kwargs,
    )
    trainer = DPOTrainer(
        model=get_peft_model(model, lora),
        args=args,
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def assert_same(ours: list[dict], theirs: list[dict]) -> None:
    """Step 1 within 1e-5 (relative to the value where it exceeds 1: summed log-probs are near -160); step 2,
    after an update from these gradients, within 2e-4: the two forwards differ in fp32 rounding (TRL pads
    its batch otherwise), about 1e-3 on a summed log-prob, and the update carries that on."""
    assert len(ours) == len(theirs) == 2
    later = ("loss", "rewards/margins", "logps/chosen", "logps/rejected")
    for step, tol, names in ((1, 1e-5, METRICS), (2, 2e-4, later)):
        a, b = ours[step - 1], theirs[step - 1]
        for name in names:
            assert abs(a[name] - b[name]) <= tol * max(1.0, abs(b[name])), (step, name, a[name], b[name])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_steps_equal_trl(tmp_path, tiny_model_dir, pairs, loss_type):
    smoothing = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    theirs = trl_history(tmp_path, tiny_model_dir, pairs, loss_type, **smoothing)
    ours = qwen_ft_history(tmp_path, tiny_model_dir, pairs, "dpo", False, loss_type=loss_type, **smoothing)
    assert_same(ours, theirs)
    if loss_type == "sigmoid":  # a fresh adapter: the policy is the reference
        assert ours[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_packed_pairs_train_as_unpacked(tmp_path, tiny_model_dir, pairs):
    packed = qwen_ft_history(tmp_path, tiny_model_dir, pairs, "dpo", True)
    unpacked = qwen_ft_history(tmp_path, tiny_model_dir, pairs, "dpo", False)
    assert_same(packed, unpacked)


def test_simpo_loss_equals_trl_cpo_simpo_on_the_same_log_probs():
    """SimPO's formula against TRL's own (CPOTrainer.cpo_loss, loss_type="simpo"), on the same summed log-probs.
    (A whole CPOTrainer step renders other ids: it re-tokenizes the rendered text and appends an EOS token
    after the template's closing newline.)"""
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer

    from qwen_ft.train.preference import PairLogps, simpo_losses

    g = torch.Generator().manual_seed(0)
    sums, lens = -torch.rand(2, 5, generator=g) * 40, torch.randint(3, 20, (2, 5), generator=g)
    policy = PairLogps(sums[0], sums[1], lens[0], lens[1])
    avg = policy.averaged()
    for smoothing in (0.0, 0.2):
        trl = SimpleNamespace(
            alpha=0.0,
            beta=0.7,
            simpo_gamma=0.4,
            label_smoothing=smoothing,
            loss_type="simpo",
            accelerator=SimpleNamespace(device=torch.device("cpu")),
        )
        losses, chosen, rejected = CPOTrainer.cpo_loss(trl, avg.chosen, avg.rejected)
        ours, metrics = simpo_losses(policy, 0.7, 0.4, smoothing)
        torch.testing.assert_close(ours, losses, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(metrics["rewards/chosen"], chosen)
        torch.testing.assert_close(metrics["rewards/rejected"], rejected)


def test_adapter_disabled_reference_equals_a_separate_frozen_copy(tiny_model_dir):
    """The reference the loss computes (the LoRA model with its adapter off, chunked log-probs of the learned
    positions) equals a separately loaded stock model's full-logits log-probs, per sequence."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_ft.config.schema import PreferenceSettings
    from qwen_ft.data.collate import collate_pairs
    from qwen_ft.train.preference_loss import PreferenceLoss

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # noqa: E731
    torch.manual_seed(0)
    policy = get_peft_model(load(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    frozen = load().eval()
    g = torch.Generator().manual_seed(1)
    pairs = []
    for n_prompt, n_c, n_r in ((5, 4, 6), (3, 7, 2)):
        prompt = torch.randint(0, 1000, (n_prompt,), generator=g).tolist()
        c, r = (torch.randint(0, 1000, (n,), generator=g).tolist() for n in (n_c, n_r))
        pairs.append(
            {
                "input_ids": prompt + c,
                "labels": [-100] * n_prompt + c,
                "rejected_ids": prompt + r,
                "rejected_labels": [-100] * n_prompt + r,
            }
        )
    batch = collate_pairs([pairs], pad_id=0, packed=True)
    loss = PreferenceLoss(policy, "dpo", PreferenceSettings(), chunk=3)
    with torch.no_grad(), loss.reference():
        ours, counts = loss.sequence_logps(policy, batch)
        adapted, _ = loss.sequence_logps(policy, batch)
    with torch.no_grad():
        policy_on, _ = loss.sequence_logps(policy, batch)
    expected = []
    for pair in pairs:
        for ids, labels in ((pair["input_ids"], pair["labels"]), (pair["rejected_ids"], pair["rejected_labels"])):
            logits = frozen(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            keep = target != -100
            expected.append(logits.log_softmax(-1)[keep].gather(1, target[keep][:, None]).sum())
    torch.testing.assert_close(ours, torch.stack(expected), rtol=1e-5, atol=1e-4)
    assert counts.tolist() == [4, 6, 7, 2] and torch.equal(ours, adapted)
    assert (policy_on - ours).abs().max() > 1e-3  # the adapter is on again outside the reference


def test_simpo_trains_without_a_reference_and_logs_trl_metrics(tmp_path, tiny_model_dir, pairs):
    history = qwen_ft_history(tmp_path, tiny_model_dir, pairs, "simpo", True, beta=2.0, simpo_gamma=0.5)
    assert all(math.isfinite(h["loss"]) for h in history) and history[1]["loss"] < history[0]["loss"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"} <= set(
        history[0]
    )
