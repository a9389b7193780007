"""Model families: what qwen-ft knows about each, read from the checkpoint, never from its path.

A family names the LoRA target modules (all linear layers), the modules trained by
"LoRA (emb)" (input embeddings and output layer), and whether transformers runs it natively.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen_ft.errors import QwenFtError


@dataclass(frozen=True)
class Family:
    """Per-family facts used to build adapters."""

    name: str
    model_types: tuple[str, ...]
    lora_targets: tuple[str, ...]
    embedding_modules: tuple[str, ...]


QWEN2_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILIES = {
    "qwen2": Family("qwen2", ("qwen2",), QWEN2_LINEAR, ("embed_tokens", "lm_head")),
    "qwen3": Family("qwen3", ("qwen3",), QWEN2_LINEAR, ("embed_tokens", "lm_head")),
    # Qwen v1 is trained after conversion to the native Qwen2 layout (qwen_ft.model.qwen_v1), so its
    # adapters target the native names.
    "qwen": Family("qwen", ("qwen",), QWEN2_LINEAR, ("embed_tokens", "lm_head")),
}


def checkpoint_model_type(path: str | Path) -> str:
    """`model_type` from the checkpoint's config.json.

    Raises:
        QwenFtError: no readable config.json.
    """
    cfg_file = Path(path) / "config.json"
    try:
        return str(json.loads(cfg_file.read_text())["model_type"])
    except FileNotFoundError:
        raise QwenFtError(f"{cfg_file} not found; model.path must be a checkpoint directory") from None
    except (json.JSONDecodeError, KeyError) as e:
        raise QwenFtError(f"{cfg_file}: cannot read model_type ({e})") from None


def resolve_family(declared: str, path: str | Path) -> Family:
    """The family of the checkpoint at `path`; a declared family must agree with its config.json.

    Raises:
        QwenFtError: unknown model_type, or a declared family that contradicts the checkpoint.
    """
    model_type = checkpoint_model_type(path)
    config = json.loads((Path(path) / "config.json").read_text())
    if "QWenLMHeadModel" in (config.get("architectures") or []):
        model_type = "qwen"
    found = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    if found is None:
        raise QwenFtError(f"{path}: model_type {model_type!r} is not a Qwen family qwen-ft knows "
                          f"({', '.join(FAMILIES)})")
    if declared != "auto" and declared != found.name:
        raise QwenFtError(f"model.family: {declared!r} but {path}/config.json says model_type {model_type!r}; "
                          f"set model.family: {found.name} (or auto)")
    return found
