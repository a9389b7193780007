"""GGUF export equals llama.cpp's own converter, tensor by tensor and key by key, for every family qwen-ft
trains; Q8_0 stays within its error of the weights; the GGUF runs in llama.cpp with transformers' logits;
adapters are merged first; bad requests are refused before anything is written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from qwen_ft.errors import QwenFtError
from qwen_ft.export.gguf.export import export_gguf
from qwen_ft.model.tiny import FAMILIES, make_tiny_model
from tests.integration.gguf_reference import convert, differences, read, value

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny(tiny_family):
    """Tiny checkpoints of each family (real vocabularies, hidden 64, 2 layers), made on first use."""
    return tiny_family


@pytest.mark.extras("sentencepiece")  # llama.cpp's converter imports it for every BPE vocabulary
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_equals_llama_cpp_converter(tiny, family, tmp_path):
    model = tiny(family)
    ours = export_gguf(model, tmp_path / "ours.gguf", "f16").path
    reference = convert(model, tmp_path / "reference.gguf", "f16")
    # llama.cpp's qwen2moe loader needs output.weight, which a tied checkpoint does not store: we write it
    extra = ("output.weight",) if family == "qwen2_moe" else ()
    assert differences(ours, reference, extra) == []


@pytest.mark.extras("sentencepiece")
@pytest.mark.parametrize("dtype", ["bf16", "q8_0"])
@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_moe"])
def test_bf16_and_q8_0_equal_llama_cpp_converter(tiny, family, dtype, tmp_path):
    model = tiny(family)
    ours = export_gguf(model, tmp_path / "ours.gguf", dtype).path
    assert differences(ours, convert(model, tmp_path / "reference.gguf", dtype)) == []


def test_q8_0_dequantizes_to_the_weights_within_its_error(tiny, tmp_path):
    """Q8_0 stores each block of 32 as int8 times one scale amax/127, kept in f16: rounding is at most half a
    step, plus the scale's own f16 rounding (2^-11 relative) times at most 127 steps."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    model = tiny("qwen3")
    weights = load_file(model / "model.safetensors")
    reader = GGUFReader(export_gguf(model, tmp_path / "q8.gguf", "q8_0").path)
    got = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name in (
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
    ):
        t = got[gguf_name]
        assert t.tensor_type.name == "Q8_0"
        values = dequantize(t.data, t.tensor_type).reshape(weights[hf_name].shape)
        exact = weights[hf_name].numpy().reshape(-1, 32)
        step = np.abs(exact).max(axis=1, keepdims=True) / 127
        err = np.abs(values.reshape(-1, 32) - exact)
        assert (err <= step * (0.5 + 127 / 2048) + 1e-7).all(), float((err / np.maximum(step, 1e-12)).max())
        assert err.max() > 0  # it is quantized, not a copy


@pytest.mark.extras("llama_cpp")  # llama-cpp-python compiles llama.cpp (about 7 minutes on 2 cores)
@pytest.mark.parametrize("family", ["qwen3", "qwen3_5", "qwen3_moe", "qwen3_next", "qwen2_moe", "qwen3_5_moe"])
def test_llama_cpp_logits_equal_transformers(tiny, family, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from qwen_ft.model.families import model_class

    model = tiny(family)
    path = export_gguf(model, tmp_path / "m.gguf", "f16").path
    messages = [{"role": "user", "content": "Hello! 1 + 1 = ? 你好"}]
    ids = AutoTokenizer.from_pretrained(model).apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    hf = model_class(model).from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    try:
        assert (
            llm.tokenize(llm.detokenize(ids, special=True), add_bos=False, special=True) == ids
        )  # the same vocabulary
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    assert np.abs(got - expected).max() < 1e-3


def test_adapter_is_merged_first_and_keeps_the_trained_template(run_config, tmp_path):
    """An adapter exports as its merge does; a data.chat_template override reaches tokenizer_config.json,
    which the gguf package reads first, and so the GGUF."""
    from qwen_ft.cli.main import main

    template = tmp_path / "plain.jinja"
    template.write_text(
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
    )
    config = run_config(data={"chat_template": str(template)}, train={"max_steps": 1})
    assert main(["train", config]) == 0
    adapter, merged = tmp_path / "out", tmp_path / "merged"
    saved = json.loads((adapter / "tokenizer_config.json").read_text())["chat_template"]
    assert saved == template.read_text() == (adapter / "chat_template.jinja").read_text()
    assert main(["merge", str(adapter), "--out", str(merged)]) == 0
    from_adapter = export_gguf(adapter, tmp_path / "a.gguf", "f16").path
    from_merged = export_gguf(merged, tmp_path / "m.gguf", "f16").path
    (keys, tensors), (merged_keys, merged_tensors) = read(from_adapter), read(from_merged)
    assert tensors == merged_tensors
    assert {k: v for k, v in keys.items() if k != "general.name"} == {
        k: v for k, v in merged_keys.items() if k != "general.name"
    }
    assert value(from_adapter, "general.name") != value(from_merged, "general.name")  # the adapter's own name
    assert value(from_adapter, "tokenizer.chat_template") == template.read_text()
    for d in (adapter, merged):  # SERVING.md names where the output is, not the temporary it was written in
        serving = (d / "SERVING.md").read_text()
        assert str(d.resolve()) in serving and ".tmp" not in serving
    assert not list(tmp_path.glob(".qwen-ft-export-*"))  # the temporary merge is gone


def test_bad_requests_are_refused_before_writing(tiny, tmp_path, capsys):
    from qwen_ft.cli.main import main

    model = tiny("qwen3")
    with pytest.raises(QwenFtError, match="choose one of f16, bf16, q8_0"):
        export_gguf(model, tmp_path / "x.gguf", "q4_0")
    existing = tmp_path / "taken.gguf"
    existing.write_bytes(b"keep")
    with pytest.raises(QwenFtError, match="exists; choose a new path, or pass --overwrite"):
        export_gguf(model, existing, "f16")
    assert existing.read_bytes() == b"keep"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(model), "--to", "ggml", "--out", str(tmp_path / "y.gguf")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'ggml' (choose from" in capsys.readouterr().err
    gptq = tmp_path / "gptq"
    shutil.copytree(model, gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (gptq / "config.json").write_text(json.dumps(config))
    with pytest.raises(QwenFtError, match="holds gptq weights.*export the adapter directory"):
        export_gguf(gptq, tmp_path / "z.gguf", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gptq", "taken.gguf"]


def test_routing_llama_cpp_would_compute_differently_is_refused(tiny, tmp_path):
    moe = tmp_path / "moe"
    shutil.copytree(tiny("qwen3_moe"), moe)
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**config, "norm_topk_prob": False}))
    with pytest.raises(QwenFtError, match="norm_topk_prob False but llama.cpp's qwen3moe always renormalises"):
        export_gguf(moe, tmp_path / "moe.gguf", "f16")


def peft_adapter(base, out, targets, **lora):
    """A stock peft LoRA on `base` (random non-zero A and B, B enlarged so the adapter matters), saved."""
    from peft import LoraConfig, get_peft_model

    from qwen_ft.model.families import model_class

    torch.manual_seed(0)
    model = get_peft_model(
        model_class(base).from_pretrained(base, dtype=torch.float32),
        LoraConfig(target_modules=targets, init_lora_weights=False, **lora),
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data *= 20
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return out


GDN_TARGETS = r".*language_model.*\.(in_proj_qkv|in_proj_z|in_proj_a|in_proj_b|out_proj|q_proj|down_proj)"


@pytest.mark.extras("sentencepiece")
@pytest.mark.parametrize("family", ["qwen3", "qwen3_5"])
def test_lora_equals_llama_cpp_lora_converter(tiny, family, tmp_path):
    """Qwen3.5: the Gated DeltaNet projections' value heads are tiled on B's rows and out_proj's A columns."""
    from qwen_ft.export.gguf.lora import export_lora
    from tests.integration.gguf_reference import convert_lora

    targets = ["q_proj", "v_proj", "down_proj"] if family == "qwen3" else GDN_TARGETS
    adapter = peft_adapter(tiny(family), tmp_path / "lora", targets, r=8, lora_alpha=16)
    ours = export_lora(adapter, tmp_path / "ours.gguf", "f16").path
    assert differences(ours, convert_lora(adapter, tiny(family), tmp_path / "reference.gguf")) == []


@pytest.mark.extras("llama_cpp")
def test_llama_cpp_serves_an_rslora_adapter_as_peft_does(tiny, tmp_path):
    """rsLoRA with a per-layer rank: llama.cpp's alpha / rank is made peft's alpha / sqrt(rank) by scaling B."""
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwen_ft.export.gguf.lora import export_lora

    base = tiny("qwen3")
    lora = dict(r=16, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 4})
    adapter = peft_adapter(base, tmp_path / "rs", ["q_proj", "v_proj", "down_proj"], **lora)
    ids = [151644, 872, 198, 9707, 0, 16, 488, 220, 16, 151645, 198, 151644, 77091, 198]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with torch.no_grad():
        expected = model.eval()(input_ids=torch.tensor([ids])).logits[0].numpy()
        plain = model.get_base_model()
        with model.disable_adapter():
            without = plain(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = Llama(
        model_path=str(export_gguf(base, tmp_path / "base.gguf", "f16").path),
        lora_path=str(export_lora(adapter, tmp_path / "rs.gguf", "f16").path),
        n_ctx=64,
        logits_all=True,
        verbose=False,
        n_threads=2,
    )
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    assert np.abs(got - expected).max() < 1e-3 < np.abs(expected - without).max()


def test_lora_export_refuses_what_llama_cpp_cannot_hold(tiny, tmp_path):
    from qwen_ft.export.gguf.lora import export_lora

    experts = peft_adapter(
        tiny("qwen3_moe"), tmp_path / "experts", ["q_proj"], r=4, target_parameters=["mlp.experts.gate_up_proj"]
    )
    with pytest.raises(QwenFtError, match="adapts the routed experts.*qwen-ft export .* --to gguf"):
        export_lora(experts, tmp_path / "e.gguf")
    dora = peft_adapter(tiny("qwen3"), tmp_path / "dora", ["q_proj"], r=4, use_dora=True)
    with pytest.raises(QwenFtError, match="llama.cpp: it is a DoRA adapter"):
        export_lora(dora, tmp_path / "d.gguf")
    head = peft_adapter(tiny("qwen3"), tmp_path / "head", ["q_proj", "lm_head"], r=4)  # the tiny model ties it
    with pytest.raises(QwenFtError, match="it adapts lm_head, which its base ties to the embeddings"):
        export_lora(head, tmp_path / "h.gguf")
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.extras("sentencepiece")
def test_qwen_v1_checkpoint_exports_as_its_native_conversion(tmp_path):
    """A Qwen v1 checkpoint (QWenLMHeadModel, qwen.tiktoken) is exported from the native Qwen2 conversion it is
    trained in: equal to llama.cpp's converter run on that conversion (`qwen-ft convert`), vocabulary, ChatML
    template and all; an Ollama export of it gets the same template."""
    from qwen_ft.export.ollama import export_ollama
    from qwen_ft.model.qwen_v1 import convert_checkpoint
    from tests.integration.test_qwen_v1 import V1_CONFIG, v1_tensors, write_v1

    src = write_v1(tmp_path / "v1" / "qwen-7b-chat", v1_tensors(), V1_CONFIG)
    ours = export_gguf(src, tmp_path / "ours.gguf", "f16").path
    native = convert_checkpoint(src, tmp_path / "native" / "qwen-7b-chat")  # the same name: general.name
    assert differences(ours, convert(native, tmp_path / "reference.gguf", "f16")) == []
    assert value(ours, "general.architecture") == "qwen2" and value(ours, "tokenizer.ggml.pre") == "qwen2"
    assert "<|im_start|>" in value(ours, "tokenizer.chat_template")
    assert not list((tmp_path / "v1").glob(".qwen-ft-export-*"))  # the temporary conversion is gone
    modelfile = (export_ollama(src, tmp_path / "ollama", "f16") / "Modelfile").read_text()
    assert "{{ .Content }}<|im_end|>" in modelfile and "PARAMETER stop <|im_end|>" in modelfile


PEAK = """
import re, sys
from pathlib import Path
from qwen_ft.export.gguf.export import export_gguf
import gguf, safetensors, torch, transformers  # noqa: F401 (imported before the peak is reset)

def high_water():  # the kernel's peak resident set size of this process (VmHWM), in kB
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident size
before = high_water()
export_gguf(sys.argv[1], sys.argv[2], "f16")
print(before, high_water())
"""


def test_export_memory_does_not_grow_with_the_model(tmp_path):
    """Streamed tensor by tensor: the export's peak resident memory (measured by the kernel, in its own
    process) of a 14-layer model exceeds that of a 2-layer one of the same width by far less than the 12
    layers' bytes, which an export holding the model would add in full."""
    import subprocess
    import sys

    peaks, sizes = [], []
    for layers in (2, 14):
        model = make_tiny_model(tmp_path / f"m{layers}", "qwen3", hidden=512, layers=layers)
        sizes.append(sum(f.stat().st_size for f in model.glob("*.safetensors")))
        run = subprocess.run(
            [sys.executable, "-c", PEAK, str(model), str(tmp_path / f"m{layers}.gguf")],
            capture_output=True,
            text=True,
            check=True,
        )
        before, after = map(int, run.stdout.split()[-2:])  # kB
        peaks.append((after - before) * 1024)
    grown, added = peaks[1] - peaks[0], sizes[1] - sizes[0]
    mib = [round(x / 2**20) for x in (*peaks, added)]
    print(f"peak over baseline {mib[0]} / {mib[1]} MiB; 12 layers: {mib[2]} MiB")
    assert added > 100 * 2**20 and grown < 0.15 * added, (peaks, sizes)


@pytest.mark.extras("llama_cpp")
def test_llama_cpp_runs_a_qwen_v1_export_as_v1_computes(tmp_path):
    """The GGUF of a Qwen v1 checkpoint, in llama.cpp, gives the logits of v1's own network (written out in
    tests/integration/test_qwen_v1.py from its definition) within 1e-3. The layers' weights are scaled to
    a trained model's size (that fixture's are up to 0.3, where llama.cpp's f16 arithmetic alone moves
    logits by 2e-3)."""
    from llama_cpp import Llama

    from tests.integration.test_qwen_v1 import V1_CONFIG, v1_reference_logits, v1_tensors, write_v1

    tensors = {k: v * 0.1 if v.dim() == 2 and ".h." in k else v for k, v in v1_tensors().items()}
    src = write_v1(tmp_path / "v1" / "qwen-7b-chat", tensors, V1_CONFIG)
    path = export_gguf(src, tmp_path / "v1.gguf", "f16").path
    ids = [151644, 872, 198, 9707, 0, 16, 488, 220, 16, 151645, 198, 151644, 77091, 198]
    with torch.no_grad():
        expected = v1_reference_logits(tensors, torch.tensor(ids)).numpy()
    llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    skipped = {
        k: torch.zeros_like(v) if ".h." in k and k.endswith(("c_proj.weight",)) else v for k, v in tensors.items()
    }
    with torch.no_grad():  # the layers' outputs zeroed: what the logits would be if the layers did nothing
        inert = v1_reference_logits(skipped, torch.tensor(ids)).numpy()
    print(f"Qwen v1 in llama.cpp: max |logit diff| {np.abs(got - expected).max():.2e}")
    assert np.abs(got - expected).max() < 1e-3 < 0.01 < np.abs(expected - inert).max()
