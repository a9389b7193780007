"""Outputs serve exactly as they were trained: adapter, merged and converted directories load in stock
transformers and peft (a process that never imports qwen_ft, started elsewhere), carry the tokenizer
and chat template, keep the base's generation config with the end-of-turn ids, and apply_chat_template
there gives the ids training used."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.test_qwen_v1 import V1_CONFIG, v1_tensors, write_v1

pytestmark = pytest.mark.slow

ROWS = [
    {
        "messages": [
            {"role": "user", "content": "Capital of Peru?"},
            {"role": "assistant", "content": "Lima.", "reasoning_content": "It is Lima."},
        ]
    },
    {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "user", "content": "Call f."},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "done"},
            {"role": "assistant", "content": "Done."},
        ],
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    },
]
BASE_GENERATION = {
    "top_p": 0.8,
    "temperature": 0.7,
    "max_new_tokens": 2048,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
}

STOCK = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from peft import AutoPeftModelForCausalLM

dirs, convs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
AutoPeftModelForCausalLM.from_pretrained(dirs["adapter"])  # resolves the base from adapter_config.json
out = {}
for name, d in dirs.items():
    if name != "adapter":
        AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    out[name] = {"ids": [list(tok.apply_chat_template(c["messages"], tools=c["tools"], tokenize=True,
                                                      **c["kwargs"])["input_ids"]) for c in convs[name]],
                 "generation": GenerationConfig.from_pretrained(d).to_dict()}
out["qwen_ft imported"] = any(m.split(".")[0] == "qwen_ft" for m in sys.modules)
print(json.dumps(out))
"""


def cli(*args: str) -> None:
    """qwen-ft's own steps run in this process; only the serving side needs a process of its own."""
    from qwen_ft.cli.main import main

    assert main(list(args)) == 0


def trained_ids(config: str, tmp_path) -> list[list[int]]:
    """The ids training used: the run's tokenized cache, dumped."""
    dump = tmp_path / "dump.jsonl"
    cli("preprocess", "--config", config, "--dump", str(dump))
    return [json.loads(line)["input_ids"] for line in dump.read_text().splitlines()]


def test_adapter_merged_and_converted_outputs_serve_with_the_training_ids(run_config, tiny_model_dir, tmp_path):
    from qwen_ft.data.formats import normalise

    (tiny_model_dir / "generation_config.json").write_text(json.dumps(BASE_GENERATION))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = run_config(data={"train_files": [str(data)], "max_length": 512}, train={"max_steps": 2})
    cli("train", config)
    adapter, merged = tmp_path / "out", tmp_path / "merged"
    cli("merge", str(adapter), "--out", str(merged))
    v1 = write_v1(tmp_path / "v1", v1_tensors(), V1_CONFIG)
    (v1 / "generation_config.json").write_text(
        json.dumps({"chat_format": "chatml", "eos_token_id": 151643, "max_window_size": 6144, "top_p": 0.8})
    )
    converted = tmp_path / "converted"
    cli("convert", str(v1), "--out", str(converted))
    convs = [normalise(r, None)[0] for r in ROWS]
    dirs = {"adapter": str(adapter), "merged": str(merged), "converted": str(converted)}
    texts = {"adapter": convs, "merged": convs, "converted": [convs[2]]}  # v1 ChatML: text turns only
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", STOCK, json.dumps(dirs), json.dumps(texts)],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert served["qwen_ft imported"] is False
    trained = trained_ids(config, tmp_path)
    assert served["adapter"]["ids"] == trained and served["merged"]["ids"] == trained
    for name in ("adapter", "merged"):
        generation = served[name]["generation"]
        assert generation["eos_token_id"] == [151645, 151643]
        assert (generation["top_p"], generation["temperature"], generation["max_new_tokens"]) == (0.8, 0.7, 2048)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir.resolve()
    )
    conv_gen = served["converted"]["generation"]
    assert conv_gen["eos_token_id"] == [151643, 151645] and conv_gen["top_p"] == 0.8
    v1_cfg = tmp_path / "v1.yaml"
    v1_cfg.write_text(
        json.dumps(
            {
                "model": {"path": str(converted)},
                "data": {"train_files": [str(tmp_path / "plain.jsonl")], "cache_dir": str(tmp_path / "cache")},
            }
        )
    )
    (tmp_path / "plain.jsonl").write_text(json.dumps(ROWS[2]) + "\n")
    assert served["converted"]["ids"] == trained_ids(str(v1_cfg), tmp_path)
