"""Merge a LoRA adapter into its base and write a standalone model that stock transformers loads.

The merge is done in fp32 and checks itself: the merged model's logits on a ChatML probe are
compared with base+adapter logits, and the merge fails (writing nothing) if the difference is
above tolerance. When the output dtype is bf16/fp16 the cast model is checked too, against a
looser, dtype-appropriate tolerance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_ft.errors import QwenFtError
from qwen_ft.files import atomic_dir
from qwen_ft.model.load import DTYPES, resolve_dtype

# Max |logit diff| allowed, relative to max(1, max |reference logit|).
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}


@dataclass(frozen=True)
class MergeReport:
    """What the merge measured."""

    out_dir: Path
    dtype: str
    merge_diff: float  # fp32 merged vs fp32 base+adapter
    cast_diff: float  # output-dtype merged vs fp32 base+adapter (equals merge_diff for fp32)
    tolerance: float
    merged_into: str = ""  # which base the adapter was merged into
    quantized_diff: float | None = None  # merged vs adapter on the quantized base it was trained on (Q-LoRA)
    perplexity: dict | None = None  # {"merged": p, "adapter on quantized base": p, "on": where from}


def read_manifest(adapter_dir: Path) -> dict:
    """manifest.json of a qwen-ft output, checked to be an adapter.

    Raises:
        QwenFtError: not an adapter directory.
    """
    if not (adapter_dir / "adapter_config.json").is_file():
        hint = " it holds a full model already; nothing to merge" if (adapter_dir / "config.json").is_file() else ""
        raise QwenFtError(f"{adapter_dir}: no adapter_config.json;{hint or ' point at a LoRA output directory'}")
    path = adapter_dir / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve_base(adapter_dir: Path, manifest: dict, base: str | None) -> Path:
    """The base checkpoint: --base, else the one recorded in the manifest.

    Raises:
        QwenFtError: neither is available, or the recorded base changed since training.
    """
    from qwen_ft.model.fingerprint import recorded_base

    if base:
        return Path(base)
    return recorded_base(adapter_dir, manifest, "pass --base DIR to merge into another (or the changed) base")


def probe_ids(tok) -> torch.Tensor:
    """A short ChatML prompt in the model's vocabulary, rendered as training renders Qwen v1 ChatML."""
    from qwen_ft.config.schema import DEFAULT_SYSTEM
    from qwen_ft.data.render import Renderer

    msgs = [("system", DEFAULT_SYSTEM), ("user", "Hello! 1 + 1 = ? 你好"), ("assistant", "2")]
    conv = {"messages": [{"role": r, "content": c} for r, c in msgs], "learn": [True]}
    ids, _, _ = Renderer(tok, None).render(conv)
    return torch.tensor([ids])


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits (fp32, on the host) of `ids` run where the model's embeddings are: a GPTQ base sits on the GPU
    its kernels need, while the merged model is on the host."""
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def merge_adapter(
    adapter_dir: str,
    out_dir: str,
    base: str | None = None,
    dtype: str = "auto",
    eval_data: str | None = None,
    overwrite: bool = False,
    allow_pickle_weights: bool = False,
    servers: list[str] | None = None,
) -> MergeReport:
    """Merge, check, and save; see module docstring.

    Q-LoRA adapters are merged into the original-precision base when one is given (--base) or
    recorded (bitsandbytes: the checkpoint quantized on load), else into the dequantized GPTQ
    weights; the merged model is then also compared with adapter-on-quantized-base (logits and
    perplexity on a few conversations).

    `servers` (merge --for): SERVING.md covers only these (default: every server), and a merged model one
    of them cannot serve (llama.cpp and Ollama: a family with no GGUF export) is refused before it is written.

    Raises:
        QwenFtError: bad inputs, a server that cannot serve it, or a merge check above tolerance (nothing is
            written then).
    """
    from peft import PeftModel

    from qwen_ft.export.servers import gguf_status, refuse_unservable
    from qwen_ft.tokenizer import load_tokenizer

    src = Path(adapter_dir)
    manifest = read_manifest(src)
    check_out(Path(out_dir), src, manifest, base, overwrite)
    check_weights(src, manifest, base, allow_pickle_weights)
    tok = load_tokenizer(src)
    model, merged_into, base_path = merge_base(src, manifest, base)
    refuse_unservable(f"the merge of {src}", {}, servers or [], gguf_status(base_path), "Leave it out of --for")
    name = dtype if dtype != "auto" else _checkpoint_dtype(model)
    model = PeftModel.from_pretrained(model, src).eval()
    ids = probe_ids(tok)
    reference = _logits(model, ids)
    merged = model.merge_and_unload().eval()
    merged_logits = _logits(merged, ids)
    merge_diff = (merged_logits - reference).abs().max().item()
    quantized = _quantized_comparison(src, manifest, merged, merged_logits, ids, tok, eval_data)
    merged = merged.to(DTYPES[name])
    cast_diff = merge_diff if name == "fp32" else (_logits(merged, ids) - reference).abs().max().item()
    scale = max(1.0, reference.abs().max().item())
    tol = TOLERANCE[name] * scale
    if merge_diff > TOLERANCE["fp32"] * scale or cast_diff > tol:
        raise QwenFtError(
            f"merge check failed: max |logit diff| {merge_diff:.3g} (fp32), {cast_diff:.3g} ({name}); "
            f"tolerance {tol:.3g}; nothing written"
        )
    needed = sum(t.numel() * t.element_size() for t in merged.state_dict().values())
    with atomic_dir(out_dir, needed=needed) as tmp:  # killed or out of room midway: no half-written model
        _save(merged, tok, src, tmp, manifest, base_path, Path(out_dir).resolve(), servers)
    return MergeReport(Path(out_dir), name, merge_diff, cast_diff, tol, merged_into, *quantized)


def check_weights(adapter: Path, manifest: dict, base: str | None, allow: bool) -> None:
    """Refuse pickle-only (.bin) adapter or base weights unless allowed.

    Raises:
        QwenFtError: naming the directory and the fix.
    """
    from qwen_ft.model.checks import pickle_weights_problem

    if allow:
        return
    quant = manifest.get("quant") or {}
    dirs = [
        adapter,
        *(Path(p) for p in (base, (manifest.get("base_model") or {}).get("path"), quant.get("original_base")) if p),
    ]
    for d in dirs:
        problem = pickle_weights_problem(d, "merge", "pass --allow-pickle-weights")
        if problem:
            raise QwenFtError(problem)


def check_out(out: Path, adapter: Path, manifest: dict, base: str | None, overwrite: bool) -> None:
    """Refuse, before anything is read or written, an --out that is the adapter, a base, or (without
    `overwrite`) any directory that already holds a model; with `overwrite` such a directory is replaced
    whole once the merged model is complete.

    Raises:
        QwenFtError: naming the directory and the fix.
    """
    quant = manifest.get("quant") or {}
    sources = [
        adapter,
        *(Path(p) for p in (base, (manifest.get("base_model") or {}).get("path"), quant.get("original_base")) if p),
    ]
    if any(s.resolve().is_relative_to(out.resolve()) for s in sources):
        raise QwenFtError(
            f"--out {out} is (or holds) the adapter or a base model this merge reads; choose a new directory"
        )
    holds = [
        f
        for f in ("config.json", "adapter_config.json", "model.safetensors", "model.safetensors.index.json")
        if (out / f).is_file()
    ]
    if holds and not overwrite:
        raise QwenFtError(
            f"--out {out} already holds a model ({', '.join(holds)}); choose a new directory, or pass "
            "--overwrite to replace it"
        )


def merge_base(src: Path, manifest: dict, base: str | None):
    """(fp32 dense base model, description, its path) to merge the adapter into."""
    from qwen_ft.model.families import model_class

    quant = manifest.get("quant") or {}
    chosen = base or quant.get("original_base")
    if not chosen and quant.get("backend") == "gptq":
        from qwen_ft.export.dequant import dequantize_to_dense

        path = resolve_base(src, manifest, None)
        return dequantize_to_dense(str(path), torch.float32), f"dequantized GPTQ weights of {path}", path
    path = Path(chosen) if chosen else resolve_base(src, manifest, None)
    if not (path / "config.json").is_file():
        raise QwenFtError(f"{path}: not a checkpoint directory (no config.json)")
    model = model_class(path).from_pretrained(path, dtype=torch.float32, local_files_only=True)
    if getattr(model.config, "quantization_config", None) is not None:
        raise QwenFtError(
            f"{path} is quantized; merging in place into quantized weights is not supported: pass the "
            "original-precision checkpoint as --base, or omit --base to merge into dequantized weights"
        )
    return model, f"{'--base' if base else 'original-precision base'} {path}", path


def _quantized_comparison(src: Path, manifest: dict, merged, merged_logits, ids, tok, eval_data):
    """For Q-LoRA: (max |logit diff| merged vs adapter-on-quantized-base, perplexities); (None, None) otherwise."""
    if not manifest.get("quant"):
        return None, None
    from qwen_ft.export.quality import held_out, perplexity

    on_quantized = adapter_on_quantized_base(src, manifest)
    diff = (_logits(on_quantized, ids) - merged_logits).abs().max().item()
    convs, where = held_out(src / "run_config.yaml", eval_data)
    ppl = {
        "merged": perplexity(merged, tok, convs),
        "adapter on quantized base": perplexity(on_quantized, tok, convs),
        "on": where,
    }
    return diff, ppl


def quantized_base(src: Path, manifest: dict):
    """The quantized base the adapter was trained on, loaded as in training (CPU, fp32 compute); a
    mixture of experts' fused experts are quantized (bnb) or replaced by the GPTQ checkpoint's per-expert
    linears only once peft wraps them (adapter_on_quantized_base): not a model to run on its own."""
    from qwen_ft.model.quant import load_bnb_base, load_gptq_base

    cfg = _trained_config(src, manifest)
    load = load_bnb_base if cfg.quant.backend == "bnb" else load_gptq_base
    return load(cfg.model, cfg.quant, _CPU_FP32, "sdpa", torch.device("cpu")).eval()


def adapter_on_quantized_base(src: Path, manifest: dict):
    """The adapter in `src` on the quantized base, as it was trained (4-bit experts included)."""
    from peft import PeftModel

    from qwen_ft.model.quant import quantize_experts

    model = PeftModel.from_pretrained(quantized_base(src, manifest), src)
    cfg = _trained_config(src, manifest)
    return quantize_experts(model, cfg.quant, cfg.model.path, _CPU_FP32).eval()


def _trained_config(src: Path, manifest: dict):
    from qwen_ft.config.load import load_config

    return load_config(src / "run_config.yaml", [f"model.path={manifest['base_model']['path']}"])


_CPU_FP32 = resolve_dtype("fp32", torch.device("cpu"))


def _checkpoint_dtype(model) -> str:
    found = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(found, torch.dtype):
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(found, "fp32")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(str(found), "fp32")


def _save(
    merged, tok, src: Path, out: Path, manifest: dict, base_path: Path, final: Path, servers: list[str] | None
) -> None:
    """Standalone model: safetensors shards, tokenizer files and chat template (the adapter's, which
    rendered its data), the base's generation config with the end-of-turn ids, manifest, and SERVING.md
    (naming `final`, where `out` is renamed to)."""
    from qwen_ft.export.servers import template_kwargs, write_serving
    from qwen_ft.model.families import resolve_family
    from qwen_ft.model.generation import write_generation_config
    from qwen_ft.model.layout import BaseLayout, add_base_tensors, trained_state

    merged.config.use_cache = True  # training switches the cache off; inference wants it
    layout = BaseLayout.of(base_path, resolve_family("auto", base_path))
    state = trained_state(merged.state_dict(), layout.prefixes) if layout else None
    merged.save_pretrained(out, safe_serialization=True, max_shard_size="5GB", state_dict=state)
    if layout:  # the vision tower and MTP tensors exactly as the base has them
        add_base_tensors(layout.path, out, layout.prefixes)
    write_generation_config(base_path, tok, out)
    tok.save_files(out)  # with the adapter's chat_template.jinja when it has one
    merged_manifest = {
        **manifest,
        "merged_from": {"adapter": str(src.resolve()), "base": str(base_path.resolve())},
        "method": "merged",
    }
    (out / "manifest.json").write_text(json.dumps(merged_manifest, indent=2))
    write_serving(out, servers, kwargs=template_kwargs(src), at=final)  # the adapter's run recorded the kwargs
