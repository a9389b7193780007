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


@dataclass(frozen=True)
class QuantizeReport:
    """What the quantization measured."""

    out_dir: Path
    calibration: int
    held_out: int
    ppl_before: float
    ppl_after: float


def refuse_unsupported(model_dir: str) -> None:
    """Qwen3.5/3.6 are refused before anything loads: gptqmodel 7.6 loads a composite checkpoint through
    its image and video processors (torchvision) and writes it without the `mtp.*` tensors, and on the
    tiny hybrid model its torch kernel fails on the Gated DeltaNet's narrow in_proj_a/in_proj_b. Nothing
    qwen-ft has checked would come out; a merged bf16 model is served as is.

    Raises:
        QwenFtError: naming the family and what to do instead.
    """
    from qwen_ft.model.families import resolve_family

    family = resolve_family("auto", model_dir)
    if family.packing == "gdn":
        raise QwenFtError(f"{model_dir} is {family.note}: qwen-ft quantize does not re-quantize this family yet "
                          "(its vision tower and MTP tensors would not be kept, and its Gated DeltaNet layers are "
                          "not checked with gptqmodel); serve the merged model in bf16, or quantize with the "
                          "serving stack's own tools")


def check_group_size(model, group_size: int) -> None:
    """Every linear layer's input width must be a multiple of the group size.

    Raises:
        QwenFtError: naming the first layer that does not fit and the sizes that would.
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head") and module.in_features % group_size:
            fits = [g for g in (32, 64, 128) if module.in_features % g == 0]
            raise QwenFtError(f"--group-size {group_size} does not divide the {module.in_features} input features of "
                              f"{name}; use --group-size {fits[-1] if fits else -1}")


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


def quantize_model(model_dir: str, out_dir: str, bits: int, group_size: int, calibration: str,
                   n_calib: int = 128, eval_data: str | None = None, max_length: int = 2048) -> QuantizeReport:
    """GPTQ-quantize `model_dir` into `out_dir` and measure perplexity before and after.

    Raises:
        QwenFtError: a family this command cannot re-quantize yet, or a group size that does not fit.
    """
    refuse_unsupported(model_dir)
    deps.require("gptq", "qwen-ft quantize")
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoModelForCausalLM

    from qwen_ft.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    calib, held = split([calibration], n_calib, 8, eval_data)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    check_group_size(dense, group_size)
    before = perplexity(dense, tok, held, max_length)
    del dense
    samples = [r[0][:max_length] for r in Renderer.of(tok).render_many(calib) if not isinstance(r, RowError)]
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    _per_layer_logs_into(Path(out_dir) / "quant_logs")
    model = GPTQModel.load(model_dir, QuantizeConfig(bits=bits, group_size=group_size))
    model.quantize([{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples], batch_size=1)
    model.save(out_dir)
    tok.save_files(out_dir)  # the vocabulary files qwen-ft reads, whatever gptqmodel wrote
    after = perplexity(_quantized(out_dir).eval(), tok, held, max_length)
    return QuantizeReport(Path(out_dir), len(samples), len(held), before, after)
