"""Qwen v1 -> native Qwen2: logits equal an independent v1 forward; GPTQ tensors equal; same token ids."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qwen_ft.model.qwen_v1 import convert_checkpoint, native_config
from qwen_ft.tokenizer.bundled import bundled_files
from tests.conftest import ASSETS

H, HEADS, LAYERS, FFN, VOCAB = 32, 4, 2, 48, 151936
V1_CONFIG = {
    "model_type": "qwen",
    "architectures": ["QWenLMHeadModel"],
    "vocab_size": VOCAB,
    "hidden_size": H,
    "num_attention_heads": HEADS,
    "kv_channels": H // HEADS,
    "num_hidden_layers": LAYERS,
    "intermediate_size": 2 * FFN,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "layer_norm_epsilon": 1e-6,
    "seq_length": 256,
    "bf16": False,
    "fp16": False,
    "no_bias": True,
    "tie_word_embeddings": False,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
}


def v1_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    t = {
        "transformer.wte.weight": rnd(VOCAB, H),
        "transformer.ln_f.weight": 1 + rnd(H),
        "lm_head.weight": rnd(VOCAB, H),
    }
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        t |= {
            p + "ln_1.weight": 1 + rnd(H),
            p + "ln_2.weight": 1 + rnd(H),
            p + "attn.c_attn.weight": rnd(3 * H, H, scale=0.3),
            p + "attn.c_attn.bias": rnd(3 * H, scale=0.3),
            p + "attn.c_proj.weight": rnd(H, H, scale=0.3),
            p + "mlp.w1.weight": rnd(FFN, H, scale=0.3),
            p + "mlp.w2.weight": rnd(FFN, H, scale=0.3),
            p + "mlp.c_proj.weight": rnd(H, FFN, scale=0.3),
            p + "attn.rotary_emb.inv_freq": torch.arange(0, H // HEADS, 2).float(),
        }
    return t


def write_v1(root: Path, tensors: dict, config: dict) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(root / "model.safetensors"))
    shutil.copyfile(bundled_files("qwen")[0], root / "qwen.tiktoken")
    return root


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def v1_reference_logits(t: dict, ids: torch.Tensor) -> torch.Tensor:
    """The Qwen v1 network from its definition: fused c_attn with bias, RMSNorm, full-head rotary,
    causal attention, c_proj(w1(x) * silu(w2(x))), final norm, untied head."""
    hd, n = H // HEADS, ids.shape[0]
    x = t["transformer.wte.weight"][ids]
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(n).float(), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rotate(u):  # [heads, n, hd]; v1's _rotate_half convention
        u1, u2 = u.chunk(2, dim=-1)
        return u * cos + torch.cat([-u2, u1], -1) * sin

    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        h = rms(x, t[p + "ln_1.weight"])
        q, k, v = (h @ t[p + "attn.c_attn.weight"].T + t[p + "attn.c_attn.bias"]).split(H, dim=-1)
        q, k, v = (z.view(n, HEADS, hd).transpose(0, 1) for z in (q, k, v))
        att = torch.softmax(rotate(q) @ rotate(k).transpose(1, 2) / math.sqrt(hd) + mask, dim=-1) @ v
        x = x + att.transpose(0, 1).reshape(n, H) @ t[p + "attn.c_proj.weight"].T
        h = rms(x, t[p + "ln_2.weight"])
        x = x + ((h @ t[p + "mlp.w1.weight"].T) * F.silu(h @ t[p + "mlp.w2.weight"].T)) @ t[p + "mlp.c_proj.weight"].T
    return rms(x, t["transformer.ln_f.weight"]) @ t["lm_head.weight"].T


@pytest.fixture(scope="module")
def v1_dense(tmp_path_factory):
    tensors = v1_tensors()
    return write_v1(tmp_path_factory.mktemp("v1") / "qwen-v1", tensors, V1_CONFIG), tensors


def test_config_mapping():
    c = native_config(V1_CONFIG)
    assert (c["model_type"], c["intermediate_size"], c["num_key_value_heads"], c["max_position_embeddings"]) == (
        "qwen2",
        FFN,
        HEADS,
        256,
    )
    assert c["rope_parameters"]["rope_theta"] == 10000.0 and c["rms_norm_eps"] == 1e-6
    assert c["tie_word_embeddings"] is False and c["hidden_act"] == "silu"
    from qwen_ft.errors import QwenFtError

    with pytest.raises(QwenFtError, match="kv_channels"):
        native_config({**V1_CONFIG, "kv_channels": 4})


def test_converted_logits_match_v1_reference(v1_dense, tmp_path):
    from transformers import AutoModelForCausalLM

    src, tensors = v1_dense
    out = convert_checkpoint(src, tmp_path / "native", dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([151644, 872, 198, 108386, 3837, 16, 17, 18, 151645, 198, 151644, 77091, 198, 9707])
    with torch.no_grad():
        got = model(input_ids=ids[None], use_cache=False).logits[0]
    diff = (got - v1_reference_logits(tensors, ids)).abs().max().item()
    print(f"max |logit diff| native vs v1 reference: {diff:.3g}")
    assert diff < 1e-5
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]


def test_unexpected_tensor_is_an_error(tmp_path):
    from qwen_ft.errors import QwenFtError

    tensors = v1_tensors() | {"transformer.h.0.attn.mystery": torch.zeros(2)}
    src = write_v1(tmp_path / "odd", tensors, V1_CONFIG)
    with pytest.raises(QwenFtError, match="unexpected tensor 'transformer.h.0.attn.mystery'"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


CORPUS = json.loads((ASSETS / "tokenizer_corpus.json").read_text(encoding="utf-8"))  # scripts, emoji, whitespace


def test_converted_tokenizer_ids_equal_tiktoken(tmp_path):
    from qwen_ft.tokenizer import load_tokenizer
    from qwen_ft.tokenizer.convert import convert_tiktoken

    src = bundled_files("qwen")[0]
    tiktoken_tok, hf_tok = load_tokenizer(src.parent), load_tokenizer(convert_tiktoken(src, tmp_path))
    lines = list(CORPUS)
    from tests.conftest import REPO

    for line in (REPO / "data/example_chatml.jsonl").read_text(encoding="utf-8").splitlines():
        lines += [m["content"] for m in json.loads(line)["messages"]]
    agree = sum(tiktoken_tok.encode(t) == hf_tok.encode(t) for t in lines)
    print(f"tokenizer agreement: {agree}/{len(lines)} texts")
    assert agree == len(lines)
    assert (hf_tok.im_start_id, hf_tok.im_end_id, hf_tok.endoftext_id) == (151644, 151645, 151643)
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert raw.token_to_id("<|extra_0|>") == 151646 and raw.token_to_id("<|extra_204|>") == 151850


# GPTQ: a v1 Int4 layout with packed tensors; dequantization is written here from the format.


def pack_cols(z: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 4-bit values -> [rows, cols/8] int32, 8 values per int32 along a row, low bits first.

    qzeros packs along output columns this way; qweight packs along input rows (pack the transpose)."""
    z = z.to(torch.int64).view(z.shape[0], z.shape[1] // 8, 8)
    packed = sum(z[:, :, j] << (4 * j) for j in range(8))
    return torch.tensor(((packed + 2**31) % 2**32 - 2**31).tolist(), dtype=torch.int32)


def dequant(qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """GPTQ ("gptq" checkpoint format: stored zero = zero - 1) -> dense [in, out] fp32."""
    shifts = torch.arange(0, 32, 4)
    q = ((qweight.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])
    z = ((qzeros.to(torch.int64)[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(qzeros.shape[0], -1)
    return scales[g_idx].float() * (q - (z[g_idx] + 1)).float()


def gptq_module(g, n_in: int, n_out: int, group: int = 16) -> dict[str, torch.Tensor]:
    q = torch.randint(0, 16, (n_in, n_out), generator=g)
    z = torch.randint(0, 15, (n_in // group, n_out), generator=g)
    scales = (torch.rand(n_in // group, n_out, generator=g) * 0.01).half()
    return {
        "qweight": pack_cols(q.T).T.contiguous(),
        "qzeros": pack_cols(z),
        "scales": scales,
        "g_idx": torch.arange(n_in, dtype=torch.int32) // group,
    }


@pytest.fixture(scope="module")
def v1_gptq(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    dense = v1_tensors(1)
    t = {k: v for k, v in dense.items() if "attn.c_" not in k and "mlp." not in k}
    shapes = {
        "attn.c_attn": (H, 3 * H),
        "attn.c_proj": (H, H),
        "mlp.w1": (H, FFN),
        "mlp.w2": (H, FFN),
        "mlp.c_proj": (FFN, H),
    }
    for i in range(LAYERS):
        for mod, (n_in, n_out) in shapes.items():
            for part, value in gptq_module(g, n_in, n_out).items():
                t[f"transformer.h.{i}.{mod}.{part}"] = value
        t[f"transformer.h.{i}.attn.c_attn.bias"] = dense[f"transformer.h.{i}.attn.c_attn.bias"].half()
    config = {
        **V1_CONFIG,
        "fp16": True,
        "quantization_config": {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": 16,
            "desc_act": False,
            "sym": True,
            "checkpoint_format": "gptq",
        },
    }
    return write_v1(tmp_path_factory.mktemp("v1q") / "qwen-v1-int4", t, config), t


def module_dequant(t: dict, prefix: str) -> torch.Tensor:
    return dequant(*(t[f"{prefix}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")))


def test_gptq_dequantized_weights_equal_exactly(v1_gptq, tmp_path):
    src, original = v1_gptq
    out = convert_checkpoint(src, tmp_path / "native-int4")
    converted = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    for i in range(LAYERS):
        fused = module_dequant(original, f"transformer.h.{i}.attn.c_attn")
        parts = [module_dequant(converted, f"model.layers.{i}.self_attn.{p}_proj") for p in "qkv"]
        assert torch.equal(torch.cat(parts, dim=1), fused)
        bias = torch.cat([converted[f"model.layers.{i}.self_attn.{p}_proj.bias"] for p in "qkv"])
        assert torch.equal(bias, original[f"transformer.h.{i}.attn.c_attn.bias"])
        for v1_name, native in (
            ("mlp.w2", "mlp.gate_proj"),
            ("mlp.w1", "mlp.up_proj"),
            ("mlp.c_proj", "mlp.down_proj"),
            ("attn.c_proj", "self_attn.o_proj"),
        ):
            assert torch.equal(
                module_dequant(converted, f"model.layers.{i}.{native}"),
                module_dequant(original, f"transformer.h.{i}.{v1_name}"),
            )


@pytest.mark.extras("gptqmodel")
def test_gptq_converted_checkpoint_loads_with_the_real_kernel(v1_gptq, tmp_path):
    from qwen_ft.export.dequant import dense_weight, load_gptq_model

    src, original = v1_gptq
    out = convert_checkpoint(src, tmp_path / "native-int4")
    model = load_gptq_model(str(out))
    q_proj = model.model.layers[0].self_attn.q_proj
    fused = module_dequant(original, "transformer.h.0.attn.c_attn")
    assert torch.allclose(dense_weight(q_proj).float().T, fused[:, :H], atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_training_on_a_v1_directory_converts_on_load_and_merges_natively(v1_dense, run_config, tmp_path, capsys):
    from peft import PeftConfig

    from qwen_ft.cli.main import main

    src, _ = v1_dense
    assert main(["train", run_config(model={"path": str(src)}), "train.max_steps=2"]) == 0
    log = capsys.readouterr().out
    assert "Qwen v1 checkpoint" in log and "converted to the native layout" in log
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_type"] == "qwen2" and "converted" in manifest["base_model"]["path"]
    assert set(PeftConfig.from_pretrained(out).target_modules) >= {"q_proj", "gate_proj"}
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["model_type"] == "qwen2" and (tmp_path / "merged" / "tokenizer.json").is_file()
    assert (
        main(
            [
                "train",
                run_config(model={"path": str(src)}),
                "train.max_steps=1",
                f"train.output_dir={tmp_path / 'again'}",
            ]
        )
        == 0
    )  # the cached conversion is reused
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1


@pytest.mark.slow
@pytest.mark.extras("gptqmodel")
def test_qlora_on_a_v1_gptq_directory(v1_gptq, run_config, tmp_path):
    from qwen_ft.cli.main import main

    src, _ = v1_gptq
    cfg = run_config(model={"path": str(src)}, method="qlora", quant={"backend": "gptq"}, train={"max_steps": 2})
    assert main(["train", cfg]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["quant"]["backend"] == "gptq" and manifest["model_type"] == "qwen2"
