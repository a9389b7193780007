"""Preference tuning against TRL 1.16 as the oracle: the same tiny model, data, LoRA initialisation and
optimiser settings give the same losses and metrics at steps 1 and 2 (step 2 follows a real update, so
it checks the gradients too), packed or not; a fresh adapter's first DPO loss is ln 2. TRL runs in fp32
like qwen-ft here (its default is bf16 autocast, on CPU too)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.integration.conftest import write_run_yaml

pytestmark = pytest.mark.extras("trl")
SEED, PAIRS, LR, MAX_STEPS = 7, 4, 1e-2, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """The first pairs of the bundled example (explicit conversational prompts: TRL reads one form per file)."""
    rows = (REPO / "data" / "example_dpo.jsonl").read_text().splitlines()
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(rows[:PAIRS]) + "\n")
    return path


def qwen_ft_history(
    tmp_path,
    model_dir,
    data: Path,
    objective: str,
    packing: bool,
    method: str = "lora",
    model=None,
    micro_batch_size: int = PAIRS,
    **preference,
) -> list[dict]:
    from qwen_ft.cli.main import main

    out = tmp_path / f"out-{packing}"
    config = write_run_yaml(
        tmp_path / "run.yaml",
        model_dir,
        tmp_path,
        data={"train_files": [str(data)], "packing": packing, "default_system": ""},
        method=method,
        objective=objective,
        preference=preference,
        model=model or {},
        lora={} if model else {"r": 8, "alpha": 16, "dropout": 0.0},
        train={
            "output_dir": str(out),
            "micro_batch_size": micro_batch_size,
            "grad_accum": 1,
            "learning_rate": LR,
            "max_steps": MAX_STEPS,
            "warmup_ratio": 0.0,
            "scheduler": "constant",
            "weight_decay": 0.0,
            "adam_beta2": 0.999,
            "seed": SEED,
        },
    )
    assert main(["train", config]) == 0
    return [h for h in json.loads((out / "train_history.json").read_text()) if "loss" in h]


def trl_history(
    tmp_path, model_dir, data: Path, loss_type: str, adapter: Path | None | bool = None, **kwargs
) -> list[dict]:
    """TRL's DPOTrainer steps: a fresh LoRA, (`adapter`) continuing a trained one against its frozen copy, or
    (`adapter=False`) the whole model against a frozen copy of it."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**trl_args(tmp_path, PAIRS), max_length=None, loss_type=[loss_type], **kwargs)
    return trl_steps(tmp_path, model_dir, data, DPOTrainer, args, adapter)


def trl_args(tmp_path, batch: int) -> dict:
    """TRL's training arguments for the same optimisation as `qwen_ft_history`'s, on CPU in fp32."""
    return {
        "output_dir": str(tmp_path / "trl"),
        "per_device_train_batch_size": batch,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "max_steps": MAX_STEPS,
        "logging_steps": 1,
        "weight_decay": 0.0,
        "adam_beta2": 0.999,
        "max_grad_norm": 1.0,
        "seed": SEED,
        "report_to": [],
        "use_cpu": True,
        "bf16": False,  # TRL's default is bf16 autocast, on CPU too; qwen-ft runs this tiny model in fp32
        "save_strategy": "no",
    }


def trl_steps(tmp_path, model_dir, data: Path, trainer_class, args, adapter: Path | None | bool = None) -> list[dict]:
    """The logged steps of a TRL trainer on the tiny model with a fresh LoRA (or `adapter`; False: no LoRA)
    and `data`."""
    from datasets import load_dataset
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    trainer = trainer_class(
        model=(
            model
            if adapter is False
            else PeftModel.from_pretrained(model, adapter, is_trainable=True)
            if adapter
            else get_peft_model(model, lora)
        ),
        args=args,
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def assert_same(ours: list[dict], theirs: list[dict]) -> None:
    """Steps 1 and 2 (after an update from step 1's gradients) within 1e-5, relative to the value where it
    exceeds 1 (summed log-probs are near -160). Measured: step 1 <= 1e-7, step 2 <= 1.2e-6."""
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs, strict=True):
        for name in METRICS:
            assert abs(a[name] - b[name]) <= 1e-5 * max(1.0, abs(b[name])), (a["step"], name, a[name], b[name])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_steps_equal_trl(tmp_path, tiny_model_dir, pairs, loss_type):
    smoothing = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    theirs = trl_history(tmp_path, tiny_model_dir, pairs, loss_type, **smoothing)
    ours = qwen_ft_history(tmp_path, tiny_model_dir, pairs, "dpo", False, loss_type=loss_type, **smoothing)
    assert_same(ours, theirs)
    if loss_type == "sigmoid":  # a fresh adapter: the policy is the reference
        assert ours[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_from_an_sft_adapter_equals_trl_against_its_frozen_copy(tmp_path, tiny_model_dir, pairs):
    """model.adapter: the trained adapter starts from a (here random, as if SFT-trained) adapter and the
    reference is that adapter frozen, as TRL does with a PeftModel ("ref" adapter); only the trained adapter
    is saved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    sft = tmp_path / "sft-adapter"
    get_peft_model(base, lora).save_pretrained(sft)
    theirs = trl_history(tmp_path, tiny_model_dir, pairs, "sigmoid", adapter=sft)
    ours = qwen_ft_history(tmp_path, tiny_model_dir, pairs, "dpo", True, model={"adapter": str(sft)})
    assert_same(ours, theirs)
    assert ours[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)  # the policy starts as its reference
    out = tmp_path / "out-True"
    assert not (out / "reference").exists() and json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_full_fine_tuning_dpo_equals_trl_against_a_frozen_copy(tmp_path, tiny_model_dir, pairs):
    """method: full: every weight trains and the reference is a frozen copy of the base, as TRL makes it."""
    theirs = trl_history(tmp_path, tiny_model_dir, pairs, "sigmoid", adapter=False)
    ours = qwen_ft_history(tmp_path, tiny_model_dir, pairs, "dpo", True, method="full")
    assert_same(ours, theirs)
    assert ours[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_packed_pairs_train_as_unpacked(tmp_path, tiny_model_dir, pairs):
    packed = qwen_ft_history(tmp_path, tiny_model_dir, pairs, "dpo", True)
    unpacked = qwen_ft_history(tmp_path, tiny_model_dir, pairs, "dpo", False)
    assert_same(packed, unpacked)


def random_pairs(shapes, seed: int = 1) -> list[dict]:
    """Collated-form pairs of random ids, one per (prompt, chosen, rejected) length."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for n_prompt, n_c, n_r in shapes:
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
    return pairs


@pytest.mark.parametrize("embeddings", [False, True], ids=["lora", "lora-emb"])
def test_adapter_disabled_reference_equals_a_separate_frozen_copy(tiny_model_dir, embeddings):
    """The reference the loss computes (the LoRA model with its adapter off, chunked log-probs of the learned
    positions) equals a separately loaded stock model's full-logits log-probs, per sequence; with trained
    embeddings and output layer (modules_to_save, changed here so a leak would show) too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_ft.config.schema import PreferenceSettings
    from qwen_ft.data.collate import collate_pairs
    from qwen_ft.train.preference_loss import PreferenceLoss

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # noqa: E731
    torch.manual_seed(0)
    saved = ["embed_tokens", "lm_head"] if embeddings else None
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, modules_to_save=saved)
    policy = get_peft_model(load(), lora)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    frozen = load().eval()
    pairs = random_pairs(((5, 4, 6), (3, 7, 2)))
    batch = collate_pairs([pairs], pad_id=0, packed=True)
    loss = PreferenceLoss(policy, "dpo", PreferenceSettings(), chunk=3)
    with torch.no_grad(), loss.reference():
        ours, counts, _ = loss.sequence_logps(policy, batch)
        adapted, _, _ = loss.sequence_logps(policy, batch)
    with torch.no_grad():
        policy_on, _, _ = loss.sequence_logps(policy, batch)
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


@pytest.mark.parametrize("objective, method", [("simpo", "lora"), ("orpo", "full")])
def test_reference_free_objectives_train_and_log_trl_metrics(tmp_path, tiny_model_dir, pairs, objective, method):
    settings = {"beta": 2.0, "simpo_gamma": 0.5} if objective == "simpo" else {"beta": 0.5}
    history = qwen_ft_history(tmp_path, tiny_model_dir, pairs, objective, True, method=method, **settings)
    assert all(math.isfinite(h["loss"]) for h in history) and history[1]["loss"] < history[0]["loss"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"} <= set(
        history[0]
    )
    if objective == "orpo":
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(history[0])


def trl_batch_loss(trainer_class, loss_name: str, model, pairs: list[dict], **settings) -> tuple[torch.Tensor, dict]:
    """TRL's ORPOTrainer or CPOTrainer `get_batch_loss_metrics` on right-padded chosen/rejected rows of `pairs`
    (their tokenization appends an EOS to rendered text, so their whole step sees other ids)."""
    from functools import partial
    from types import SimpleNamespace

    from torch.nn.utils.rnn import pad_sequence

    def padded(key: str, value: int) -> torch.Tensor:
        return pad_sequence([torch.tensor(p[key]) for p in pairs], batch_first=True, padding_value=value)

    batch = {}
    for side, ids, labels in (("chosen", "input_ids", "labels"), ("rejected", "rejected_ids", "rejected_labels")):
        batch[f"{side}_input_ids"], batch[f"{side}_labels"] = padded(ids, 0), padded(labels, -100)
        batch[f"{side}_attention_mask"] = padded(ids, -1).ne(-1).long()
    fixed = {"is_encoder_decoder": False, "padding_value": 0, "pad_token_id": 0, "aux_loss_enabled": False}
    trl = SimpleNamespace(**fixed, **settings)
    trl.accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    trl.concatenated_inputs, trl.get_batch_logps = trainer_class.concatenated_inputs, trainer_class.get_batch_logps
    setattr(trl, loss_name, partial(getattr(trainer_class, loss_name), trl))
    trl.concatenated_forward = partial(trainer_class.concatenated_forward, trl)
    return trainer_class.get_batch_loss_metrics(trl, model, batch)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


ORPO_SETTINGS = {"beta": 0.3}
SIMPO_SETTINGS = {"beta": 2.0, "simpo_gamma": 0.4, "label_smoothing": 0.1, "cpo_alpha": 0.5}


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
@pytest.mark.parametrize("packed", [True, False])
def test_reference_free_losses_metrics_and_gradients_equal_trl(tiny_model_dir, packed, objective):
    """ORPO (odds ratio on mean completion log-probs, plus the NLL of the whole chosen sequences, prompt
    included) and SimPO (with CPO's chosen NLL, cpo_alpha) against TRL's ORPOTrainer and CPOTrainer
    (loss_type="simpo") on the same ids and LoRA weights: loss, metrics and every gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from qwen_ft.config.schema import PreferenceSettings
    from qwen_ft.data.collate import collate_pairs
    from qwen_ft.train.preference_loss import PreferenceLoss

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    pairs = random_pairs(((5, 4, 6), (3, 7, 2), (6, 2, 5)))
    settings = ORPO_SETTINGS if objective == "orpo" else SIMPO_SETTINGS
    loss_fn = PreferenceLoss(model, objective, PreferenceSettings(**settings), chunk=3)
    total, n = loss_fn(model, collate_pairs([pairs], pad_id=0, packed=packed))
    (total / n).backward()
    ours, metrics = lora_grads(model), {k: v / n for k, v in loss_fn.take_metrics().items()}
    model.zero_grad()
    if objective == "orpo":
        loss, theirs = trl_batch_loss(ORPOTrainer, "odds_ratio_loss", model, pairs, **settings)
        names = (*METRICS[1:], "nll_loss", "log_odds_ratio", "log_odds_chosen")
    else:
        loss, theirs = trl_batch_loss(CPOTrainer, "cpo_loss", model, pairs, loss_type="simpo", alpha=0.0, **settings)
        names = METRICS[1:]
    loss.backward()
    mean, loss = float(total.detach() / n), float(loss.detach())
    assert n == 3 and abs(mean - loss) <= 1e-5, (mean, loss)
    for name in names:
        assert metrics[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6)


def test_packed_pairs_through_gated_deltanet_layers_equal_unpacked_in_loss_and_gradients():
    """Qwen3.5's linear-attention layers restart at every sequence of a packed row (slow decay, so a leak
    would show), so chosen and rejected side by side, pair after pair, give the unpacked DPO loss and
    the same gradient for every LoRA tensor."""
    from peft import LoraConfig, get_peft_model

    from qwen_ft.config.schema import PreferenceSettings
    from qwen_ft.data.collate import collate_pairs
    from qwen_ft.model.linear_attention import install_packed_gdn
    from qwen_ft.train.preference_loss import PreferenceLoss
    from tests.integration.test_gdn_packing import tiny_hybrid

    targets = ["in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "v_proj", "down_proj"]
    model = get_peft_model(tiny_hybrid(), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    assert install_packed_gdn(model) == 3
    pairs = random_pairs(((6, 5, 7), (4, 8, 3), (5, 3, 6)))  # ids < 1000, the tiny vocabulary
    results = []
    for packed in (True, False):
        loss_fn = PreferenceLoss(model, "dpo", PreferenceSettings(beta=0.5), chunk=4)
        total, n = loss_fn(model, collate_pairs([pairs[:2], pairs[2:]], 0, packed=packed, segments=packed))
        (total / n).backward()
        results.append((float(total.detach()), lora_grads(model), loss_fn.take_metrics()))
        model.zero_grad()
    (packed_loss, packed_grads, packed_metrics), (loss, grads, metrics) = results
    assert abs(packed_loss - loss) <= 1e-5 and packed_metrics == pytest.approx(metrics, rel=1e-5, abs=1e-6)
    gdn = [k for k in grads if ".linear_attn." in k and grads[k].abs().sum() > 0]
    assert gdn  # the GDN layers' adapters were trained
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6)


KTO_METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def kto_rows(tmp_path: Path, step: int) -> Path:
    """The bundled KTO example's first 8 rows (desirable and undesirable alternating; step 2: desirable only)."""
    rows = (REPO / "data" / "example_kto.jsonl").read_text().splitlines()[::step][:8]
    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def trl_kto_history(tmp_path, model_dir, data: Path, **kwargs) -> list[dict]:
    from trl import KTOConfig, KTOTrainer

    return trl_steps(tmp_path, model_dir, data, KTOTrainer, KTOConfig(**trl_args(tmp_path, 8), **kwargs))


@pytest.mark.parametrize("packing, step", [(False, 1), (True, 2)], ids=["mixed-unpacked", "desirable-packed"])
def test_kto_steps_equal_trl(tmp_path, tiny_model_dir, packing, step):
    """KTO's loss, KL estimate (mismatched prompt/completion pairs of the micro-batch, as TRL builds them) and
    metrics at steps 1 and 2 equal TRL's KTOTrainer, unpacked and packed. Desirable completions only make
    the KL estimate positive at step 2 (with both kinds it stays clamped at 0 here, in TRL too)."""
    data, weights = kto_rows(tmp_path, step), {"desirable_weight": 1.0, "undesirable_weight": 1.5}
    theirs = trl_kto_history(tmp_path, tiny_model_dir, data, **weights)
    ours = qwen_ft_history(tmp_path, tiny_model_dir, data, "kto", packing, micro_batch_size=8, **weights)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs, strict=True):
        names = [n for n in KTO_METRICS if n in b]
        assert [n for n in KTO_METRICS if n in a] == names and len(names) >= (7 if step == 1 else 4)
        for name in names:
            assert abs(a[name] - b[name]) <= 1e-5 * max(1.0, abs(b[name])), (a["step"], name, a[name], b[name])
    assert ours[0]["kl"] == 0.0  # a fresh adapter is its reference
    assert step == 1 or ours[1]["kl"] > 0.1


@pytest.mark.parametrize("method", ["lora", "full"])
def test_precomputed_reference_equals_the_live_one_and_is_read_back(tmp_path, tiny_model_dir, method, capsys):
    """preference.precompute_ref: the reference's log-probs computed once into the data cache (train and eval
    pairs) give the live reference's steps and eval losses; the next run reads them back (a full fine-tune
    then loads no frozen copy at all)."""
    from qwen_ft.cli.main import main

    def run(name: str, precompute: bool) -> list[dict]:
        out = tmp_path / name
        config = write_run_yaml(
            tmp_path / f"{name}.yaml",
            tiny_model_dir,
            tmp_path,
            data={"train_files": [str(REPO / "data" / "example_dpo.jsonl")], "eval_fraction": 0.2},
            method=method,
            objective="dpo",
            preference={"precompute_ref": precompute},
            train={"output_dir": str(out), "micro_batch_size": 4, "grad_accum": 2, "learning_rate": 1e-3},
        )
        assert main(["train", config, "train.max_steps=2", "train.eval_steps=1"]) == 0
        return json.loads((out / "train_history.json").read_text())

    live, first = run("live", False), run("precomputed", True)
    assert "reference log-probs: computed once for 22 pairs" in capsys.readouterr().out
    again = run("again", True)
    printed = capsys.readouterr().out
    assert "reference log-probs: read from" in printed and "reference: a frozen copy" not in printed
    assert len(live) == len(first) == len(again) and any("eval_loss" in h for h in live)
    for a, b, c in zip(live, first, again, strict=True):
        assert set(a) == set(b) == set(c)
        for key in set(a) - {"tokens_per_s", "step_s", "elapsed_s"}:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7) and c[key] == b[key], key


def test_a_starting_adapter_as_reference_runs_without_dropout(tmp_path, tiny_model_dir):
    """The frozen starting adapter keeps its saved lora_dropout, but the reference runs in eval mode (TRL's
    disable_dropout): the same log-probs every call, in a training step too, and the model stays in training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_ft.config.schema import PreferenceSettings
    from qwen_ft.data.collate import collate_pairs
    from qwen_ft.model.start_adapter import load_start_adapter
    from qwen_ft.train.preference_loss import PreferenceLoss

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # noqa: E731
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(load(), lora).save_pretrained(tmp_path / "sft")
    model = load_start_adapter(load(), str(tmp_path / "sft"), reference=True).train()
    loss = PreferenceLoss(model, "dpo", PreferenceSettings(), chunk=4)
    batch = collate_pairs([random_pairs(((5, 4, 6), (3, 7, 2)))], pad_id=0, packed=True)
    first, second = loss.reference_logps(batch), loss.reference_logps(batch)
    assert torch.equal(first, second) and model.training
    with torch.no_grad():
        policy = [loss.sequence_logps(model, batch)[0] for _ in range(2)]
    assert not torch.equal(*policy)  # the trained adapter's own dropout is on: the reference's is not


def test_releasing_the_frozen_copy_frees_it(tiny_model_dir):
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    from qwen_ft.config.schema import PreferenceSettings
    from qwen_ft.train.preference_loss import PreferenceLoss

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # noqa: E731
    frozen = load()
    gone = weakref.ref(frozen)
    loss = PreferenceLoss(load(), "dpo", PreferenceSettings(), chunk=4, frozen=frozen)
    del frozen
    gc.collect()
    assert gone() is not None
    loss.release_frozen()
    assert gone() is None
