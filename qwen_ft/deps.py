"""The one place that probes optional heavy packages (DeepSpeed, bitsandbytes, GPTQ, flash-attn).

Nothing here imports them (`find_spec` only looks), except `usable`, which imports a compiled
extension to prove it loads. Features call `require(...)` and get a
`MissingDependency` naming the exact `pip install` that fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from qwen_ft.errors import MissingDependency


@dataclass(frozen=True)
class Extra:
    """An optional feature: the modules it needs and the install line that provides them."""

    feature: str
    modules: tuple[str, ...]
    install: str


EXTRAS: dict[str, Extra] = {
    "deepspeed": Extra("DeepSpeed ZeRO", ("deepspeed",), "pip install 'qwen-ft[deepspeed]'"),
    "bnb": Extra("bitsandbytes 4-bit Q-LoRA", ("bitsandbytes",), "pip install 'qwen-ft[qlora]'"),
    "gptq": Extra("GPTQ bases and re-quantization", ("gptqmodel", "optimum"), "pip install 'qwen-ft[gptq]'"),
    "flash_attn": Extra("flash-attention 2", ("flash_attn",), "pip install 'qwen-ft[flash]'"),
    "gguf": Extra("GGUF export", ("gguf",), "pip install 'qwen-ft[gguf]'"),
    "liger": Extra("Liger's fused linear cross-entropy (GPU)", ("liger_kernel",), "pip install 'qwen-ft[liger]'"),
}


def is_available(name: str) -> bool:
    """True when every module of extra `name` can be imported."""
    return all(find_spec(m) is not None for m in EXTRAS[name].modules)


# The compiled part of an extra: a wheel built for another torch or CUDA is found by find_spec but
# fails here, at import, instead of in the middle of a run.
COMPILED = {"flash_attn": "flash_attn_2_cuda", "liger": "liger_kernel.ops.fused_linear_cross_entropy"}


def usable(name: str) -> bool:
    """True when extra `name` is installed and its compiled extension (if any) imports."""
    if not is_available(name):
        return False
    if name not in COMPILED:
        return True
    try:
        __import__(COMPILED[name])
    except Exception:  # noqa: BLE001 - any import failure means "not usable"; the reason is in require()
        return False
    return True


def missing_message(name: str, why: str) -> str:
    """The message for a missing extra: which feature, which modules, which pip command."""
    extra = EXTRAS[name]
    absent = [m for m in extra.modules if find_spec(m) is None]
    return f"{why} needs {extra.feature} ({', '.join(absent)} not installed): run `{extra.install}`"


def require(name: str, why: str) -> None:
    """Raise MissingDependency unless extra `name` is installed.

    Args:
        name: key of EXTRAS.
        why: what asked for it, e.g. "dist.deepspeed=zero3".

    Raises:
        MissingDependency: with the pip command that installs it.
    """
    if not is_available(name):
        raise MissingDependency(missing_message(name, why))


# What transformers and peft import at their own import time whenever it is installed: torchao for
# transformers' quantizer table, bitsandbytes for peft's helpers, gptqmodel for peft's LoRA dispatch.
# Each prints banners or warnings (and gptqmodel rewrites PYTORCH_ALLOC_CONF) although a run that
# does not use the stack never needs it. qwen-ft never uses torchao.
PROBED_BY_LIBRARIES = {
    "bnb": ("bitsandbytes",),
    "gptq": ("gptqmodel", "optimum"),
    "deepspeed": ("deepspeed",),
    "flash_attn": ("flash_attn",),
    "torchao": ("torchao",),
}


def hide_unused(used: set[str]) -> list[str]:
    """Make the stacks this process will not use look absent to every later import and probe.

    `sys.modules[name] = None` is Python's own "not importable" mark: `import name` raises
    ImportError and `importlib.util.find_spec(name)` returns None, which is how transformers and
    peft probe. For one-command processes only (the CLI): a notebook that goes on to use a hidden
    stack would find it missing. Returns the module names hidden.
    """
    import sys

    hidden = []
    for key, modules in PROBED_BY_LIBRARIES.items():
        if key in used:
            continue
        for name in modules:
            if name not in sys.modules:  # one already imported stays usable
                sys.modules[name] = None  # type: ignore[assignment]
                hidden.append(name)
    return hidden


def stacks_of_checkpoint(path: str | Path) -> set[str]:
    """The optional stacks loading the checkpoint or qwen-ft output at `path` needs: its own
    quantization, or for an adapter its manifest's method and base."""
    from qwen_ft.files import read_json_object as _read_json

    path = Path(path)
    manifest = _read_json(path / "manifest.json")
    if manifest.get("method") == "qlora":
        return {"bnb", "gptq"}
    base = (manifest.get("base_model") or {}).get("path")
    config = _read_json(Path(base) / "config.json") if base else _read_json(path / "config.json")
    method = str((config.get("quantization_config") or {}).get("quant_method", "")).lower()
    return {"gptq"} if method in ("gptq", "awq") else {"bnb"} if method == "bitsandbytes" else set()
