"""Checks of a config against the checkpoint it names (read from config.json, nothing loaded).

Combinations the stack cannot train correctly are refused here, before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qwen_ft.model.quant import gptq_settings

if TYPE_CHECKING:
    from qwen_ft.config.schema import RunConfig


def checkpoint_problems(cfg: RunConfig) -> list[str]:
    """Problems between method/quant settings and the checkpoint at model.path."""
    if not (Path(cfg.model.path) / "config.json").is_file():
        return []  # reported by the environment check
    gptq = gptq_settings(cfg.model.path)
    if cfg.method == "qlora":
        return _qlora_problems(cfg, gptq)
    if gptq is not None:
        return [f"model.path: {cfg.model.path} is a GPTQ checkpoint, whose weights cannot be trained directly; "
                "use method=qlora with quant.backend=gptq (or a full-precision checkpoint)"]
    return []


def _qlora_problems(cfg: RunConfig, gptq: dict | None) -> list[str]:
    q, problems = cfg.quant, []
    if q.backend == "gptq" and gptq is None:
        problems.append(f"quant.backend=gptq but {cfg.model.path} has no GPTQ quantization_config; "
                        "use quant.backend=bnb to quantize a full-precision checkpoint on load")
    if q.backend == "bnb" and gptq is not None:
        problems.append(f"quant.backend=bnb but {cfg.model.path} is already GPTQ-quantized; use quant.backend=gptq")
    if q.backend == "gptq" and gptq is not None:
        if int(gptq.get("bits", q.bits)) != q.bits:
            problems.append(f"quant.bits: {q.bits} but the checkpoint is {gptq.get('bits')}-bit GPTQ; "
                            f"set quant.bits={gptq.get('bits')}")
        if cfg.lora.train_embeddings and gptq.get("lm_head"):
            problems.append("lora.train_embeddings: true but this GPTQ checkpoint quantizes lm_head, which cannot "
                            "be trained; set lora.train_embeddings=false")
    if cfg.method == "qlora" and q.original_base and not (Path(q.original_base) / "config.json").is_file():
        problems.append(f"quant.original_base: {q.original_base!r} is not a checkpoint directory")
    return problems
