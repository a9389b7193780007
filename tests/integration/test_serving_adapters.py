"""Adapters written for a server are served as trained: rsLoRA folded into alpha equals the original in stock
peft, what a server would serve wrong is refused for it, and SERVING.md gives the flags each needs."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_ft.errors import QwenFtError
from qwen_ft.export.servers import export_adapter, write_serving


def make_adapter(base, out, **lora) -> object:
    """A stock peft LoRA on `base` with random (non-zero) A and B, saved to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **lora)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    return out


def logits(base, adapter) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([[151644, 872, 198, 9707, 151645]])).logits


def test_rslora_folded_for_sglang_equals_the_original_in_stock_peft(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "rs", r=16, lora_alpha=8, use_rslora=True)
    folded = export_adapter(adapter, tmp_path / "for-sglang", "sglang")
    config = json.loads((folded / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == pytest.approx(8 * 16**0.5)
    original, served = logits(tiny_model_dir, adapter), logits(tiny_model_dir, folded)
    assert (served - original).abs().max().item() <= 1e-6
    # the same weights read with plain alpha / r and no fold: what SGLang would serve, off by sqrt(r)
    plain = tmp_path / "plain"
    export_adapter(adapter, plain, "vllm")  # vLLM keeps rsLoRA: the config is unchanged
    assert json.loads((plain / "adapter_config.json").read_text())["use_rslora"] is True
    cfg = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": False}))
    assert (logits(tiny_model_dir, plain) - original).abs().max().item() > 1e-3


def test_what_a_server_would_serve_wrong_is_refused_for_it(tiny_model_dir, tmp_path):
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", r=8, use_dora=True)
    with pytest.raises(QwenFtError, match="vllm: it is a DoRA adapter.*Merge it first"):
        export_adapter(dora, tmp_path / "x", "vllm")
    embeddings = make_adapter(tiny_model_dir, tmp_path / "emb", r=8, modules_to_save=["embed_tokens"])
    with pytest.raises(QwenFtError, match="sglang: it trains embed_tokens in full"):
        export_adapter(embeddings, tmp_path / "y", "sglang")
    wide = make_adapter(tiny_model_dir, tmp_path / "wide", r=8, rank_pattern={"q_proj": 600})
    with pytest.raises(QwenFtError, match="vllm: .*its rank 600 is above the 512 it accepts"):
        export_adapter(wide, tmp_path / "z", "vllm")
    # vLLM and SGLang apply one scale to every layer: per-layer ranks would be served at the wrong scale
    with pytest.raises(QwenFtError, match="sglang: it sets per-layer ranks or alphas"):
        export_adapter(wide, tmp_path / "z", "sglang")
    assert not any((tmp_path / n).exists() for n in "xyz")
    text = write_serving(dora, base=str(tiny_model_dir)).read_text()
    assert text.count("Not servable as trained: it is a DoRA adapter") == 4  # every server
    with pytest.raises(QwenFtError, match="--to adapter needs --for"):
        export_adapter(dora, tmp_path / "w", None)


def test_serving_md_has_every_flag_each_server_needs(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "lora", r=20, lora_alpha=40, use_rslora=True)
    (adapter / "run_config.yaml").write_text("data:\n  template_kwargs:\n    enable_thinking: false\n")
    text = write_serving(adapter, base=str(tiny_model_dir)).read_text()
    vllm = text.split("## vllm")[1].split("## sglang")[0]
    for flag in (
        "--enable-lora",
        f"--lora-modules lora={adapter}",
        "--max-lora-rank 32",
        f"--chat-template {adapter / 'chat_template.jinja'}",
        f"--generation-config {adapter}",
        "--default-chat-template-kwargs '{\"enable_thinking\": false}'",
    ):
        assert flag in vllm, flag
    sglang = text.split("## sglang")[1].split("## llama.cpp")[0]
    assert f"--to adapter --for sglang --out {adapter}-sglang" in sglang  # rsLoRA: folded first
    assert f"--lora-paths lora={adapter}-sglang" in sglang and "--max-lora-rank 20" in sglang
    assert "--chat-template-kwargs '{\"enable_thinking\": false}'" in text.split("## llama.cpp")[1]


def test_trained_embeddings_are_saved_in_the_training_dtype(run_config, tiny_model_dir, tmp_path):
    """LoRA (emb) trains fp32 masters of the embeddings and output layer; the final adapter stores them in
    the training dtype (bf16: half the bytes), and stock peft on the bf16 base serves the same logits as
    from an adapter holding the fp32 masters (it casts them to its base's dtype on load)."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_ft.recipe import steps
    from qwen_ft.recipe.run import run_training
    from qwen_ft.train.distributed import DistInfo

    config = run_config(
        model={"dtype": "bf16"},
        data={"template_kwargs": {"enable_thinking": False}},
        lora={"r": 4, "train_embeddings": True},
        train={"max_steps": 1, "micro_batch_size": 1, "grad_accum": 1},
    )
    trainer, _ = run_training(steps.checked_config(config, []), DistInfo(0, 1, 0, torch.device("cpu")))
    final, masters = tmp_path / "out", tmp_path / "masters"
    trainer.unwrapped.save_pretrained(masters, selected_adapters=["default"])  # peft's own save: fp32
    dtypes = {}
    for d in (final, masters):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as st:
            dtypes[d] = {k: st.get_slice(k).get_dtype() for k in st.keys() if "lora_" not in k}
    assert set(dtypes[final].values()) == {"BF16"} and set(dtypes[masters].values()) == {"F32"}
    assert dtypes[final].keys() == dtypes[masters].keys() and len(dtypes[final]) == 2  # embeddings, lm_head
    ids = torch.tensor([[151644, 872, 198, 9707, 151645]])
    served = []
    for d in (final, masters):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        with torch.no_grad():
            served.append(PeftModel.from_pretrained(base, d).eval()(input_ids=ids).logits.float())
    assert torch.equal(served[0], served[1])
    sizes = [(d / "adapter_model.safetensors").stat().st_size for d in (final, masters)]
    assert sizes[0] < 0.55 * sizes[1], sizes
    # the run's data.template_kwargs are the output template's defaults: served as trained, unasked
    tok = AutoTokenizer.from_pretrained(final)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"), prompt


def test_serve_for_names_the_servers_and_refuses_what_one_would_serve_wrong(run_config, tmp_path, capsys):
    """train.serve_for and merge --for: SERVING.md gives those servers' commands only, and a setup a named
    server would serve wrong is refused before training starts (nothing written), naming server and reason."""
    from qwen_ft.cli.main import main

    out, merged = tmp_path / "out", tmp_path / "merged"
    bad = run_config(lora={"dora": True}, train={"max_steps": 1, "serve_for": ["vllm", "llama.cpp"]})
    assert main(["train", bad]) == 1
    err = capsys.readouterr().err
    for server in ("vllm", "llama.cpp"):
        assert f"train.serve_for: {server} would not serve this run's output as trained: it is a DoRA adapter" in err
    assert not out.exists()
    assert main(["train", bad, "train.serve_for=[vlm]"]) == 1
    assert "train.serve_for[0]: 'vlm' is not one of vllm, sglang, llama.cpp, ollama (did you mean 'vllm'?)" in (
        capsys.readouterr().err
    )
    assert main(["train", run_config(train={"max_steps": 1, "serve_for": ["vllm", "sglang"]})]) == 0
    sections = [line for line in (out / "SERVING.md").read_text().splitlines() if line.startswith("## ")]
    assert sections == ["## vllm", "## sglang"]
    assert main(["merge", str(out), "--out", str(merged), "--for", "ollama", "--for", "llama.cpp"]) == 0
    sections = [line for line in (merged / "SERVING.md").read_text().splitlines() if line.startswith("## ")]
    assert sections == ["## ollama", "## llama.cpp"]
    assert "qwen-ft export" in (merged / "SERVING.md").read_text()


def test_the_config_lists_every_server():
    import typing

    from qwen_ft.config.schema import TrainConfig
    from qwen_ft.export.servers import SERVERS

    (choices, _) = typing.get_args(typing.get_type_hints(TrainConfig)["serve_for"])
    assert typing.get_args(choices) == tuple(SERVERS)
