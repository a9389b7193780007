"""`qwen-ft export ADAPTER --to llama.cpp-lora`: a LoRA adapter as a GGUF adapter for `llama-server --lora`.

Tensors are the adapter's A and B under the base tensor's GGUF name (`blk.0.attn_q.weight.lora_a`), with
the rewrites the base tensor gets (Qwen3.5/3.6: value heads tiled, on B's rows or, for the output
projection, A's columns). llama.cpp scales every layer by `adapter.lora.alpha` / its rank; a scale peft
computes otherwise (rsLoRA's alpha / sqrt(r), per-layer ranks) is folded into B exactly, so no server-side
option is needed. Refused, naming the alternative (merge, then `--to gguf`): what llama.cpp does not
serve (DoRA, trained embeddings), adapters on the routed experts, per-layer alpha_pattern, and Qwen3-Next,
whose joint q/k/v/z projection cannot be split on a low-rank adapter.
"""

from __future__ import annotations

import math
from pathlib import Path

from qwen_ft.errors import QwenFtError
from qwen_ft.export.gguf import DTYPES
from qwen_ft.export.gguf.write import GgufReport, encode, gguf_file, layout_of, name_mapper, tensor_type


def export_lora(adapter: str | Path, out: str | Path, dtype: str = "f16", overwrite: bool = False) -> GgufReport:
    """Write the adapter in `adapter` as the GGUF LoRA `out`.

    Raises:
        QwenFtError: see module docstring, and the GGUF export's own refusals (dtype, existing output).
    """
    from qwen_ft.export.gguf.export import check_request
    from qwen_ft.export.gguf.metadata import hparams
    from qwen_ft.export.servers import adapter_config, check_for
    from qwen_ft.model.families import resolve_family

    src, dest = Path(adapter), Path(out)
    check_request(src, dest, dtype, overwrite)
    config = adapter_config(src)
    check_for(src, ["llama.cpp"])
    base = Path(config["base_model_name_or_path"])
    family = resolve_family("auto", base)
    hp = hparams(base)
    _check_supported(src, config, family, bool(hp.get("tie_word_embeddings")))
    layout = layout_of(hp, family.gguf)
    to_gguf = name_mapper(family.gguf, layout.layers)
    alpha = float(config["lora_alpha"]) * (math.sqrt(config["r"]) if config.get("use_rslora") else 1.0)
    count = 0
    with gguf_file(dest, family.gguf) as w:
        for name, a, b in _pairs(src, layout, config, alpha):
            for suffix, t in ((".lora_a", a), (".lora_b", b)):
                tensor = to_gguf(name) + suffix
                data, qtype = encode(t, tensor_type(tensor, t.ndim, DTYPES[dtype][1]))
                w.add_tensor(tensor, data, raw_dtype=qtype)
                count += 1
        _metadata(w, src, alpha)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
    return GgufReport(dest, family.gguf, dtype, count, dest.stat().st_size)


def _check_supported(src: Path, config: dict, family, tied: bool) -> None:
    from safetensors import safe_open

    with safe_open(str(src / "adapter_model.safetensors"), "pt") as st:
        st_keys = list(st.keys())
    other = [k for k in st_keys if not (".lora_A.weight" in k or ".lora_B.weight" in k)]
    why = [f"it holds tensors that are not LoRA A/B pairs ({', '.join(other[:3])})"] if other else []
    if tied and any(".lm_head." in k for k in st_keys):
        why.append("it adapts lm_head, which its base ties to the embeddings: llama.cpp has no output layer for it")
    if not config.get("lora_alpha"):
        why.append("its lora_alpha is 0")
    if config.get("target_parameters"):
        why.append("it adapts the routed experts (target_parameters), which llama.cpp's LoRA format does not hold")
    if config.get("alpha_pattern"):
        why.append("it sets per-layer alpha (alpha_pattern)")
    if family.gguf == "qwen3next":
        why.append("Qwen3-Next's joint in_proj_qkvz cannot be regrouped on a low-rank adapter")
    if not family.gguf:
        why.append(f"GGUF export of {family.note} is not supported yet")
    if why:
        raise QwenFtError(
            f"{src}: cannot write a llama.cpp LoRA: {'; '.join(why)}. Merge it and export the model instead: "
            f"qwen-ft export {src} --to gguf --out MODEL.gguf"
        )


def _pairs(src: Path, layout, config: dict, alpha: float):
    """(base tensor name, A, B) per adapted layer, B scaled so that llama.cpp's alpha / rank is peft's scale."""
    from safetensors.torch import load_file

    from qwen_ft.export.gguf.tensors import tile_v

    tensors = load_file(src / "adapter_model.safetensors")
    for key in [k for k in tensors if ".lora_A." in k]:
        a, b = tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float()
        name = key.removeprefix("base_model.model.").replace("language_model.", "", 1)
        name = name.replace(".lora_A.weight", ".weight")
        rank = a.shape[0]
        peft_scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
        b = b * (peft_scale / (alpha / rank))
        if layout.tiled_v and layout.k_heads != layout.v_heads and "linear_attn." in name:
            if ".out_proj." in name:
                a = tile_v(name, a, layout)
            else:
                b = tile_v(name, b, layout)
        yield name, a.contiguous(), b.contiguous()


def _metadata(w, src: Path, alpha: float) -> None:
    """general.type adapter, adapter.type lora, the alpha, and the adapter's model card facts."""
    import gguf

    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    total = w.get_total_parameter_count()[0]
    meta = gguf.Metadata.load(None, src, None, total)
    meta.name = meta.name or src.name
    meta.set_gguf_meta_model(w)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
