"""model.adapter: what refuses an adapter directory before anything loads."""

from __future__ import annotations

import json

from qwen_ft.config.schema import LoraSettings
from qwen_ft.model.start_adapter import adapter_problems


def adapter_dir(tmp_path, weights: str = "adapter_model.safetensors", **config):
    d = tmp_path / "adapter"
    d.mkdir()
    saved = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": False, "modules_to_save": None, **config}
    (d / "adapter_config.json").write_text(json.dumps(saved))
    (d / weights).write_bytes(b"x")
    return d


def test_a_matching_or_untouched_lora_section_is_fine(tmp_path):
    d = adapter_dir(tmp_path)
    assert adapter_problems(str(d), LoraSettings()) == []
    assert adapter_problems(str(d), LoraSettings(r=4, alpha=8)) == []


def test_lora_settings_that_contradict_the_adapter_are_refused_naming_each_key(tmp_path):
    d = adapter_dir(tmp_path, lora_dropout=0.05, target_modules=["v_proj", "q_proj"])
    settings = LoraSettings(r=16, alpha=8, dropout=0.0, target_modules=("q_proj",))
    problems = adapter_problems(str(d), settings)
    assert [p.split(":")[0] for p in problems] == ["lora.r", "lora.dropout", "lora.target_modules"]
    assert "has 4" in problems[0] and "remove the setting or make it match" in problems[0]
    assert adapter_problems(str(d), LoraSettings(dropout=0.05, target_modules=("q_proj", "v_proj"))) == []


def test_not_an_adapter_pickle_weights_and_other_peft_types_are_refused(tmp_path):
    assert "no adapter_config.json" in adapter_problems(str(tmp_path), LoraSettings())[0]
    assert (
        "pickle .bin adapters are not loaded"
        in adapter_problems(str(adapter_dir(tmp_path, weights="adapter_model.bin")), LoraSettings())[0]
    )
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    assert "IA3 adapter" in adapter_problems(str(tmp_path / "adapter"), LoraSettings())[0]
