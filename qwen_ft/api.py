"""The library API: what the `qwen-ft` commands call, usable from Python or a notebook without `qwen_ft.cli`.

    import qwen_ft
    result = qwen_ft.finetune("configs/tiny_cpu_smoke.yaml", ["train.max_steps=20"])
    qwen_ft.merge(result.model_path, "runs/merged")
    print(qwen_ft.chat("runs/merged", "Capital of Peru?"))

Each function imports what it needs when called; importing this module loads nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwen_ft.config.schema import RunConfig
    from qwen_ft.export.merge import MergeReport
    from qwen_ft.recipe.run import RunResult
    from qwen_ft.sizing.memory import RunEstimate


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The validated RunConfig of a YAML file with `key.sub=value` overrides.

    Raises:
        ConfigError: every problem at once (unknown keys with a did-you-mean, types, combinations).
    """
    from qwen_ft.config.load import load_config as load

    return load(path, overrides)


def finetune(config: str | Path | RunConfig, overrides: Sequence[str] = ()) -> RunResult:
    """Fine-tune as the config says (under torchrun, every process calls this); returns where the
    model went and the loss before and after."""
    from qwen_ft.recipe.run import finetune as run

    return run(config, tuple(overrides))


def merge(
    adapter: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    dtype: str = "auto",
    eval_data: str | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Merge a LoRA/Q-LoRA output into its base (recorded in its manifest unless `base` is given),
    self-checked against base + adapter."""
    from qwen_ft.export.merge import merge_adapter

    return merge_adapter(str(adapter), str(out), str(base) if base else None, dtype, eval_data, overwrite)


def estimate(
    config: str | Path | RunConfig, overrides: Sequence[str] = (), gpus: int = 1, dtype: str = "bf16"
) -> RunEstimate:
    """Predicted peak memory per GPU; `dtype` is what model.dtype=auto becomes."""
    from qwen_ft.config.load import config_from_dict, config_to_dict
    from qwen_ft.recipe.estimate import estimate_run

    if isinstance(config, (str, Path)):
        cfg = load_config(config, overrides)
    else:
        cfg = config_from_dict(config_to_dict(config), overrides, source="RunConfig")
    return estimate_run(cfg, gpus, dtype)


def chat(
    model: str | Path,
    prompt: str,
    adapter: str | Path | None = None,
    system: str | None = None,
    history: Sequence[tuple[str, str]] = (),
    emit: Callable[[str], None] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    template_kwargs: dict | None = None,
) -> str:
    """One reply from a model directory (a merged model, a full fine-tune or a LoRA output), to
    `prompt` after the (user, assistant) pairs in `history`, rendered by the model's chat template
    (`system` None: the template's own default); `emit` receives the text as it streams."""
    from qwen_ft.infer.chat import load_chat_model, reply

    loaded, tok = load_chat_model(str(model), str(adapter) if adapter else None)
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return reply(
        loaded,
        tok,
        [*messages, {"role": "user", "content": prompt}],
        emit or (lambda _text: None),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        template_kwargs=template_kwargs,
    )
