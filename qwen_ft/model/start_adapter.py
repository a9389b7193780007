"""Starting from a trained LoRA adapter (`model.adapter`): an SFT adapter that a preference stage (or more
SFT) continues.

The adapter is loaded as the trained one ("default", what is saved), and for an objective with a
reference a second time, frozen, as "reference": TRL's arrangement ("ref" there), so the reference is
the SFT model itself, not the bare base. Its rank, alpha and targets are the run's; a `lora:` section
that says otherwise is refused rather than silently overridden.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwen_ft.config.schema import LoraSettings

REFERENCE = "reference"
WEIGHTS = "adapter_model.safetensors"


def adapter_problems(path: str, lora: LoraSettings) -> list[str]:
    """What stops the adapter directory at `path` from starting this run."""
    d = Path(path)
    if not (d / "adapter_config.json").is_file():
        return [
            f"model.adapter: {path!r} has no adapter_config.json; point it at an adapter directory (a LoRA "
            "run's output)"
        ]
    if not (d / WEIGHTS).is_file():
        return [
            f"model.adapter: {path!r} has no {WEIGHTS} (pickle .bin adapters are not loaded: torch.load can run "
            "code); save it with safe_serialization=True"
        ]
    try:
        saved = json.loads((d / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        return [f"model.adapter: {d / 'adapter_config.json'} is not readable JSON ({e}); re-save the adapter"]
    if saved.get("peft_type") != "LORA":
        return [f"model.adapter: {path!r} is a {saved.get('peft_type')} adapter; qwen-ft continues LoRA adapters only"]
    return _settings_problems(saved, lora, path)


def _settings_problems(saved: dict, lora: LoraSettings, path: str) -> list[str]:
    """`lora:` settings, changed from their defaults, that contradict the adapter's own."""
    from qwen_ft.config.schema import LoraSettings

    theirs = {
        "r": saved.get("r"),
        "alpha": saved.get("lora_alpha"),
        "rslora": bool(saved.get("use_rslora")),
        "dora": bool(saved.get("use_dora")),
        "train_embeddings": bool(saved.get("modules_to_save")),
        "dropout": saved.get("lora_dropout"),
        "target_modules": _targets(saved),
    }
    ours = {key: getattr(lora, key) for key in theirs} | {"target_modules": tuple(sorted(lora.target_modules))}
    untouched = LoraSettings()
    return [
        f"lora.{key}: {ours[key]!r}, but the adapter at {path} has {value!r}; the run continues that "
        "adapter with its own settings: remove the setting or make it match"
        for key, value in theirs.items()
        if ours[key] != getattr(untouched, key) and ours[key] != value
    ]


def _targets(saved: dict) -> tuple[str, ...]:
    """The adapter's module and parameter targets, sorted (peft saves a list, a set or a regex string)."""
    found = saved.get("target_modules") or []
    found = [found] if isinstance(found, str) else list(found)
    return tuple(sorted({*found, *(saved.get("target_parameters") or [])}))


def load_start_adapter(model, path: str, reference: bool):
    """`model` (the base) with the adapter at `path` to train, and with `reference` its frozen copy too."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, path, is_trainable=True)
    if reference:
        model.load_adapter(path, adapter_name=REFERENCE, is_trainable=False)
    return model


@contextmanager
def reference_adapter(model):
    """The frozen starting adapter active instead of the trained one, in eval mode: its saved lora_dropout
    must not make the reference random (TRL's disable_dropout). peft's set_adapter flips the trained
    adapter's requires_grad off and back on, so this runs outside any backward."""
    training = model.training
    model.set_adapter(REFERENCE, inference_mode=True)
    model.eval()
    try:
        yield model
    finally:
        model.train(training)
        model.set_adapter("default")
