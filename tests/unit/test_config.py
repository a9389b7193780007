"""Config loading: closed schema, did-you-mean, overrides, collected errors, no mutation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from qwen_ft.cli.main import main
from qwen_ft.config.load import config_from_dict, dump_config, load_config, parse_overrides
from qwen_ft.config.schema import RunConfig
from qwen_ft.errors import ConfigError
from qwen_ft.recipe.preflight import check_environment, required_extras

BASE = {"model": {"path": "m"}, "data": {"train_files": ["d.jsonl"]}}


def problems_of(raw, overrides=()):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, overrides)
    return e.value.problems


def test_minimal_config_gets_typed_defaults():
    cfg = config_from_dict(BASE)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.train_files == ("d.jsonl",) and cfg.data.max_length == 2048
    assert cfg.method == "lora" and cfg.tokenizer_path == "m"


def test_unknown_keys_at_every_depth_with_did_you_mean():
    raw = {**BASE, "modle": {}, "data": {"train_files": ["d.jsonl"], "max_lenght": 10}}
    probs = problems_of(raw)
    assert "modle: unknown key (did you mean 'model'?)" in probs
    assert "data.max_lenght: unknown key (did you mean 'max_length'?)" in probs


def test_all_problems_collected_at_once():
    raw = {
        "model": {"path": "m", "dtype": "bf17"},
        "data": {"train_files": ["d.jsonl"], "max_length": "long", "packing": "yes"},
        "method": "lora2",
    }
    probs = problems_of(raw)
    assert len(probs) == 4, probs
    assert any(p.startswith("model.dtype: 'bf17' is not one of") and "did you mean 'bf16'" in p for p in probs)
    assert any(p.startswith("data.max_length: expected an integer") for p in probs)
    assert any(p.startswith("data.packing: expected true or false") for p in probs)
    assert any(p.startswith("method: 'lora2'") for p in probs)


def test_ranges_and_combinations_collected():
    raw = {
        "model": {"path": "m"},
        "data": {"train_files": ["d"], "eval_files": ["e"], "eval_fraction": 0.1, "max_length": 4},
        "train": {"grad_accum": 0, "learning_rate": -1},
        "method": "qlora",
        "quant": {"bits": 8},
    }
    probs = problems_of(raw)
    joined = "\n".join(probs)
    for needle in (
        "data.max_length: 4",
        "train.grad_accum: 0",
        "train.learning_rate: -1",
        "data.eval_files and data.eval_fraction",
        "quant.bits: 8 with quant.backend=bnb",
    ):
        assert needle in joined
    assert len(probs) == 5


def test_non_finite_numbers_and_negative_seed_are_refused():
    raw = {
        "model": {"path": "m"},
        "data": {"train_files": ["d"]},
        "train": {"learning_rate": float("inf"), "epochs": float("inf"), "max_grad_norm": float("nan"), "seed": -1},
        "lora": {"dropout": float("nan")},
    }
    joined = "\n".join(problems_of(raw))
    for needle in (
        "train.learning_rate: inf is not a finite number",
        "train.epochs: inf is not a finite number",
        "train.max_grad_norm: nan is not a finite number",
        "lora.dropout: nan is not a finite number",
        "train.seed: -1 must be >= 0",
    ):
        assert needle in joined, joined


@pytest.mark.parametrize("out", ["", "  ", "/"])
def test_empty_or_root_output_dir_is_refused(out):
    raw = {"model": {"path": "m"}, "data": {"train_files": ["d"]}, "train": {"output_dir": out}}
    assert any(p.startswith("train.output_dir:") and "runs/my-run" in p for p in problems_of(raw))


def test_required_fields():
    probs = problems_of({})
    assert any(p.startswith("model.path: required") for p in probs)
    assert any(p.startswith("data.train_files: required") for p in probs)


def test_overrides_coerce_and_use_yaml_names():
    cfg = config_from_dict(
        BASE, ["train.learning_rate=1e-4", "data.packing=false", "data.train_files=[a.jsonl, b.jsonl]", "lora.r=16"]
    )
    assert cfg.train.learning_rate == 1e-4 and cfg.data.packing is False
    assert cfg.data.train_files == ("a.jsonl", "b.jsonl") and cfg.lora.r == 16


def test_unknown_override_has_did_you_mean():
    probs = problems_of(BASE, ["data.max_lenght=10", "nokey"])
    assert probs[0] == "override 'data.max_lenght=10': unknown key 'data.max_lenght' (did you mean 'data.max_length'?)"
    assert "expected key.sub=value" in probs[1]
    assert parse_overrides(["train.learning_rat=1"]) == (
        [],
        ["override 'train.learning_rat=1': unknown key 'train.learning_rat' (did you mean 'train.learning_rate'?)"],
    )


def test_did_you_mean_knows_abbreviations_and_stays_in_the_section():
    """'lr' is learning_rate's initials; a key's own section is searched before the section names."""
    (prob,) = parse_overrides(["train.lr=1e-4"])[1]
    assert prob.endswith("(did you mean 'train.learning_rate'?)")
    assert parse_overrides(["trian.max_steps=3"])[1][0].endswith("(did you mean 'train.max_steps'?)")
    assert "train.lr: unknown key (did you mean 'learning_rate'?)" in problems_of({**BASE, "train": {"lr": 1}})


def test_validation_never_mutates_user_mapping():
    raw = {**BASE, "data": {"train_files": ["d.jsonl"], "packing": True}}
    before = copy.deepcopy(raw)
    config_from_dict(raw, ["data.max_length=128", "train.seed=3"])
    assert raw == before


def test_config_is_frozen():
    cfg = config_from_dict(BASE)
    with pytest.raises(AttributeError):
        cfg.data.max_length = 5  # type: ignore[misc]


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  path: m\n data: [\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:3" in str(e.value) or f"{p}:4" in str(e.value)


def test_dump_roundtrips(tmp_path):
    cfg = config_from_dict(BASE, ["lora.target_modules=[q_proj]"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_environment_reports_missing_paths_and_extras(monkeypatch):
    import qwen_ft.deps as deps

    monkeypatch.setattr(deps, "find_spec", lambda name: None)
    cfg = config_from_dict(BASE, ["dist.deepspeed=zero3", "method=qlora"])
    assert [e for e, _ in required_extras(cfg)] == ["deepspeed", "bnb"]
    probs = check_environment(cfg)
    assert any("model.path: 'm' is not a directory" in p for p in probs)
    assert any("data.train_files: data file 'd.jsonl' not found" in p for p in probs)
    assert any("pip install 'qwen-ft[deepspeed]'" in p for p in probs)
    assert any("pip install 'qwen-ft[qlora]'" in p for p in probs)


def test_liger_loss_kernel_is_refused_where_it_cannot_run(monkeypatch):
    """loss_kernel=liger: refused with the chunked loss off or under ZeRO-3; its extra is required
    (auto, the default, needs nothing)."""
    import qwen_ft.deps as deps

    probs = problems_of(BASE, ["train.loss_kernel=liger", "train.loss_chunk_tokens=0", "dist.deepspeed=zero3"])
    assert any(p.startswith("train.loss_kernel: liger with train.loss_chunk_tokens: 0") for p in probs)
    assert any(p.startswith("train.loss_kernel: liger with dist.deepspeed=zero3") for p in probs)
    monkeypatch.setattr(deps, "find_spec", lambda name: None)
    cfg = config_from_dict(BASE, ["train.loss_kernel=liger"])
    assert ("liger", "train.loss_kernel=liger") in required_extras(cfg)
    assert any("pip install 'qwen-ft[liger]'" in p for p in check_environment(cfg))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert any("liger, but this machine has no CUDA GPU" in p for p in check_environment(cfg))
    assert not any("CUDA" in p for p in check_environment(config_from_dict(BASE)))
    assert config_from_dict(BASE).train.loss_kernel == "auto"
    assert not [e for e, _ in required_extras(config_from_dict(BASE)) if e == "liger"]


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.model.path and cfg.data.train_files
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(line.startswith("# Launch: ") for line in header), "each shipped YAML names its launch command"
    if cfg.dist.deepspeed != "none":
        assert any("DeepSpeed" in line for line in header), "configs that need DeepSpeed say so up front"


def test_validate_cli_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert main(["validate", str(good), "--no-env", "train.seed=7"]) == 0
    assert "seed: 7" in capsys.readouterr().out
    assert main(["validate", str(good), "--no-env", "train.sed=7"]) == 1
    err = capsys.readouterr().err
    assert "did you mean 'train.seed'" in err and "Traceback" not in err
    assert main(["validate", str(good)]) == 1  # env check: model path 'm' does not exist
    assert "model.path: 'm' is not a directory" in capsys.readouterr().err


def test_readme_model_table_names_shipped_configs_of_the_right_family():
    """Each row of the README's models table names configs that exist, and whose model.family is one of the
    row's model types (a row may shorten a sibling to its suffix, as `_qlora`)."""
    import re

    from qwen_ft.model.families import FAMILIES

    readme = (SHIPPED[0].parents[1] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| Qwen")]
    assert len(rows) >= 8
    for row in rows:
        cells = row.split("|")
        names = re.findall(r"`(?:configs/)?([\w.\-]+\.yaml)", cells[-2])
        assert names, row
        types = set(re.findall(r"`(\w+)`", cells[2]))
        for name in names:
            cfg = load_config(SHIPPED[0].parent / name)
            family = FAMILIES[cfg.model.family]
            assert types & {cfg.model.family, *family.model_types}, (row, name)


def test_an_integer_is_a_number_for_an_optional_number():
    """`X | None` fields coerce like X: `router_aux_loss_coef: 0` is 0.0 (it was refused: "expected float | None")."""
    from qwen_ft.config.load import config_from_dict
    from qwen_ft.errors import ConfigError

    raw = {"model": {"path": "m", "memory_budget_gib": 19}, "data": {"train_files": ["d"]}}
    cfg = config_from_dict({**raw, "train": {"router_aux_loss_coef": 0}})
    assert cfg.train.router_aux_loss_coef == 0.0 and isinstance(cfg.model.memory_budget_gib, float)
    with pytest.raises(ConfigError, match=r"model.memory_budget_gib: expected a number, got 'lots'"):
        config_from_dict({**raw, "model": {"path": "m", "memory_budget_gib": "lots"}})
