"""GPTQ re-quantization of a (merged) model with ChatML-rendered calibration conversations.

The output is a GPTQ checkpoint (safetensors + quantization_config) that transformers loads with
gptqmodel installed. Perplexity on held-out conversations is measured before and after.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_ft import deps
from qwen_ft.data.render import Renderer
from qwen_ft.data.schema import RowError
from qwen_ft.errors import QwenFtError
from qwen_ft.export.quality import load_conversations, perplexity
from qwen_ft.files import atomic_dir


@dataclass(frozen=True)
class QuantizeReport:
    """What the quantization measured."""

    out_dir: Path
    calibration: int
    held_out: int
    ppl_before: float
    ppl_after: float


def refuse_unsupported(model_dir: str) -> None:
    """Refused before anything loads, naming why and what to do instead (`Family.no_requantize`).

    Raises:
        QwenFtError: for such a family.
    """
    from qwen_ft.model.families import resolve_family

    family = resolve_family("auto", model_dir)
    if family.no_requantize:
        raise QwenFtError(
            f"{model_dir} is {family.note}: qwen-ft quantize cannot GPTQ-quantize it ("
            f"{family.no_requantize}); serve the merged model in bf16, quantize it with the serving "
            "stack's own tools, or quantize a text-only checkpoint of it"
        )


def _without_processor(model_dir: str):
    """gptqmodel 7.6 loads a vision-language checkpoint's image and video processors (which need
    torchvision) only to save them beside the quantized model; qwen-ft calibrates on text and copies
    the processor files itself (model/layout.py), so the load is switched off for that model type."""
    from contextlib import contextmanager

    from gptqmodel.models.auto import MODEL_MAP

    from qwen_ft.model.families import checkpoint_model_type

    @contextmanager
    def switched_off():
        found = MODEL_MAP.get(checkpoint_model_type(model_dir))
        before = getattr(found, "require_load_processor", False)
        if found is not None:
            found.require_load_processor = False
        try:
            yield
        finally:
            if found is not None:
                found.require_load_processor = before

    return switched_off()


def _in_base_layout(model_dir: str, out_dir: str) -> None:
    """The vision tower and MTP tensors of a composite checkpoint (Qwen3.5/3.6) byte for byte as the base
    has them (gptqmodel writes them cast to its dtype), and the base's processor files."""
    from qwen_ft.model.families import resolve_family
    from qwen_ft.model.layout import BaseLayout, add_base_tensors, drop_tensors

    layout = BaseLayout.of(model_dir, resolve_family("auto", model_dir))
    if layout:
        drop_tensors(out_dir, layout.prefixes)
        add_base_tensors(layout.path, out_dir, layout.prefixes)


def check_group_size(model, group_size: int) -> None:
    """Every linear layer of the language model's decoder layers (what gptqmodel quantizes: not the output
    layer, nor a vision tower) must have an input width that is a multiple of the group size.

    Raises:
        QwenFtError: naming the first layer that does not fit and the sizes that would.
    """
    from qwen_ft.model.load import decoder_layers

    for i, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules(prefix=f"decoder layer {i}"):
            if isinstance(module, torch.nn.Linear) and module.in_features % group_size:
                _refuse_group(name, module.in_features, group_size)


def _refuse_group(name: str, width: int, group_size: int) -> None:
    fits = [g for g in (32, 64, 128) if width % g == 0]
    raise QwenFtError(
        f"--group-size {group_size} does not divide the {width} input features of {name}; use "
        f"--group-size {fits[-1] if fits else -1}"
    )


def split(files: list[str], n_calib: int, n_eval: int, eval_data: str | None) -> tuple[list, list]:
    """Calibration conversations and held-out ones (from --eval-data, else taken after the calibration set)."""
    if eval_data:
        return load_conversations(files, n_calib), load_conversations([eval_data], n_eval)
    convs = load_conversations(files, n_calib + n_eval)
    if len(convs) < 2:
        raise QwenFtError("the calibration file needs at least 2 conversations (or pass --eval-data)")
    n_eval = min(n_eval, max(1, len(convs) // 5))
    return convs[:-n_eval], convs[-n_eval:]


def _per_layer_logs_into(folder: Path) -> None:
    """gptqmodel writes its per-layer quantization logs to ./logs, i.e. wherever the user happens to
    be; keep them with the quantized model instead. (A module-level path in gptqmodel 7.x; when a
    later version moves it, gptqmodel's default applies.)"""
    from gptqmodel.looper import loop_processor

    if isinstance(getattr(loop_processor, "_PROJECT_LOG_DIR", None), Path):
        loop_processor._PROJECT_LOG_DIR = folder


def _quantized(out_dir: str):
    """The quantized checkpoint, loaded to measure it as merge and Q-LoRA load it (a mixture of experts'
    per-expert quantized linears dequantized into its fused experts)."""
    from qwen_ft.export.dequant import load_gptq_model

    return load_gptq_model(out_dir)


def quantize_model(
    model_dir: str,
    out_dir: str,
    bits: int,
    group_size: int,
    calibration: str,
    n_calib: int = 128,
    eval_data: str | None = None,
    max_length: int = 2048,
) -> QuantizeReport:
    """GPTQ-quantize `model_dir` into `out_dir` and measure perplexity before and after.

    Raises:
        QwenFtError: a family this command cannot quantize, or a group size that does not fit.
    """
    refuse_unsupported(model_dir)
    deps.require("gptq", "qwen-ft quantize")
    from gptqmodel import GPTQModel, QuantizeConfig

    from qwen_ft.model.families import model_class
    from qwen_ft.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    calib, held = split([calibration], n_calib, 8, eval_data)
    dense = model_class(model_dir).from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    check_group_size(dense, group_size)
    before = perplexity(dense, tok, held, max_length)
    del dense
    samples = [r[0][:max_length] for r in Renderer.of(tok).render_many(calib) if not isinstance(r, RowError)]
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    with atomic_dir(out_dir) as tmp:  # killed or out of room midway: no half-written model at out_dir
        _per_layer_logs_into(tmp / "quant_logs")
        with _without_processor(model_dir):
            model = GPTQModel.load(model_dir, QuantizeConfig(bits=bits, group_size=group_size))
        model.quantize([{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples], batch_size=1)
        model.save(str(tmp))
        _in_base_layout(model_dir, str(tmp))
        tok.save_files(tmp)  # the vocabulary files qwen-ft reads, whatever gptqmodel wrote
        after = perplexity(_quantized(str(tmp)).eval(), tok, held, max_length)
    return QuantizeReport(Path(out_dir), len(samples), len(held), before, after)
