"""What each server does with a LoRA adapter, checked before an adapter is written for it, and SERVING.md.

One row per server. The facts were checked against the servers' code and docs (see docs/serving.md):

- vLLM serves rsLoRA right, refuses DoRA and trained embeddings (`modules_to_save`), and a rank above
  `--max-lora-rank` (default 16; the flag takes 8 to 512); it ignores the chat template and generation
  config in an adapter's directory, so they are passed by flag;
- SGLang and llama.cpp scale every adapter by alpha / r, so an rsLoRA adapter (alpha / sqrt(r)) is served
  wrong by a factor sqrt(r) unless alpha is rewritten (`fold_rslora`); SGLang drops trained embeddings
  silently and llama.cpp's converter refuses them and DoRA;
- Ollama runs adapters through llama.cpp (`ADAPTER` in a Modelfile), so it inherits llama.cpp's row.

Anything a server would serve wrong is refused for that server, with the alternative (merge first).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from qwen_ft.errors import QwenFtError


@dataclass(frozen=True)
class Server:
    """One server's handling of LoRA adapters."""

    name: str
    rslora: bool  # scales use_rslora adapters by alpha / sqrt(r) itself
    dora: bool
    embeddings: bool  # serves trained embeddings / output layer (modules_to_save)
    max_rank: int | None  # the largest rank it can be told to accept (None: no limit)
    patterns: bool  # honours per-layer rank_pattern / alpha_pattern (vLLM and SGLang use one scale)


SERVERS = {
    "vllm": Server("vllm", rslora=True, dora=False, embeddings=False, max_rank=512, patterns=False),
    "sglang": Server("sglang", rslora=False, dora=False, embeddings=False, max_rank=None, patterns=False),
    # llama.cpp and Ollama are served through qwen-ft's GGUF exports, which fold per-layer scales
    "llama.cpp": Server("llama.cpp", rslora=False, dora=False, embeddings=False, max_rank=None, patterns=True),
    "ollama": Server("ollama", rslora=False, dora=False, embeddings=False, max_rank=None, patterns=True),
}
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def adapter_config(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())


def max_rank(config: dict) -> int:
    """The largest rank of any adapted layer (rank_pattern overrides r per layer)."""
    return max([int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def problems(config: dict, server: Server) -> list[str]:
    """Why `server` would not serve this adapter as trained (empty: it would, after any folding)."""
    found = []
    if config.get("use_dora") and not server.dora:
        found.append("it is a DoRA adapter, which it does not serve")
    if config.get("modules_to_save") and not server.embeddings:
        found.append(
            f"it trains {', '.join(config['modules_to_save'])} in full (modules_to_save), which it drops or refuses"
        )
    if not server.patterns and (config.get("rank_pattern") or config.get("alpha_pattern")):
        found.append("it sets per-layer ranks or alphas (rank_pattern / alpha_pattern), which it ignores")
    if server.max_rank is not None and max_rank(config) > server.max_rank:
        found.append(f"its rank {max_rank(config)} is above the {server.max_rank} it accepts")
    return found


GGUF_SERVERS = ("llama.cpp", "ollama")  # served through qwen-ft's GGUF export of the model


def gguf_status(checkpoint: Path) -> str:
    """ "ok", or why qwen-ft cannot write a GGUF of a model on `checkpoint` (llama.cpp and Ollama need one)."""
    from qwen_ft.model.families import resolve_family

    try:
        family = resolve_family("auto", checkpoint)
    except (QwenFtError, OSError, ValueError):
        return f"qwen-ft cannot tell the model family of {checkpoint}"
    return "ok" if family.gguf else f"qwen-ft has no GGUF export for {family.note} yet"


def why_not(config: dict, name: str, gguf: str) -> list[str]:
    """Why `name` would not serve this model as trained: an adapter's problems (`config`: its
    adapter_config.json, {} for a full model) and, for llama.cpp and Ollama, a family with no GGUF export."""
    found = problems(config, SERVERS[name]) if config else []
    return found + ([gguf] if name in GGUF_SERVERS and gguf != "ok" else [])


def refuse_unservable(what: str, config: dict, names: list[str], gguf: str, fix: str) -> None:
    """Refuse, naming each reason and `fix`, a model some chosen server would serve wrong (see `why_not`).

    Raises:
        QwenFtError: one message for every server that cannot serve it.
    """
    lines = [f"{name}: {'; '.join(why)}" for name in names if (why := why_not(config, name, gguf))]
    if lines:
        raise QwenFtError(f"{what} cannot be served as trained by " + " | ".join(lines) + f". {fix}")


def check_for(adapter: Path, names: list[str]) -> None:
    """`refuse_unservable` for an adapter directory, whose alternative is merging it first."""
    config = adapter_config(adapter)
    base = Path(config.get("base_model_name_or_path") or adapter)
    fix = f"Merge it first (qwen-ft merge {adapter} --out DIR) and serve the merged model"
    refuse_unservable(str(adapter), config, names, gguf_status(base), fix)


def fold_rslora(config: dict) -> dict:
    """The same adapter under plain alpha / r scaling: alpha' = alpha * sqrt(r), so that alpha' / r =
    alpha / sqrt(r), rsLoRA's scale (servers that need this fold refuse per-layer patterns, see
    `problems`). Configs without rsLoRA are returned unchanged."""
    if not config.get("use_rslora"):
        return config
    return {**config, "use_rslora": False, "lora_alpha": config["lora_alpha"] * math.sqrt(config["r"])}


def write_adapter_for(adapter: Path, out: Path, name: str, config: dict) -> Path:
    """A copy of `adapter` (whose adapter_config.json is `config`, already checked for `name` by `check_for`)
    that `name` serves as trained (rsLoRA folded where the server needs it)."""
    shutil.copytree(adapter, out)
    if not SERVERS[name].rslora:
        config = fold_rslora(config)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def template_kwargs(model_dir: Path) -> dict:
    """data.template_kwargs of the run that made `model_dir` (run_config.yaml beside the weights), or {}."""
    import yaml

    run = model_dir / "run_config.yaml"
    if not run.is_file():
        return {}
    return dict(((yaml.safe_load(run.read_text()) or {}).get("data") or {}).get("template_kwargs") or {})


@dataclass(frozen=True)
class Target:
    """What SERVING.md's commands are about."""

    path: Path  # where the model or adapter will be (its final directory)
    base: str | None  # an adapter's base checkpoint; None for a full model
    config: dict  # adapter_config.json ({} for a full model)
    kwargs: dict  # the run's data.template_kwargs
    gguf: str  # "ok", or why qwen-ft cannot write a GGUF of it
    lora_gguf: bool  # a llama.cpp LoRA of the adapter can be written (else: the merged GGUF)


def serving_md(model_dir: Path, names: list[str], base: str | None, kwargs: dict, at: Path | None = None) -> str:
    """SERVING.md: the exact command per server for the model (or adapter on `base`) in `model_dir`, trained
    with the template arguments `kwargs`; commands name `at` (default `model_dir`), where it will be."""
    config = adapter_config(model_dir) if base is not None else {}
    t = _target(at or model_dir, base, Path(base) if base else model_dir, config, kwargs)
    lines = [f"# Serving {t.path.name}", "", _intro(base is not None, kwargs), ""]
    for name in names:
        why = why_not(config, name, t.gguf)
        lines += [f"## {name}", ""]
        if why:
            merge = ["```bash", f"qwen-ft merge {t.path} --out {t.path}-merged", "```", ""] if base else []
            lines += [f"Not servable as trained: {'; '.join(why)}." + (" Merge it first:" if base else ""), ""]
            lines += merge
            continue
        lines += ["```bash", *COMMANDS[name](t), "```", ""]
    return "\n".join(lines)


def _target(path: Path, base: str | None, checkpoint: Path, config: dict, kwargs: dict) -> Target:
    """The commands' subject, which will be at `path`; `checkpoint`: its base, or a full model's files now."""
    from qwen_ft.model.families import resolve_family

    gguf = gguf_status(checkpoint)
    try:
        family = resolve_family("auto", checkpoint)
        quantized = "quantization_config" in json.loads((checkpoint / "config.json").read_text())
    except (QwenFtError, OSError, ValueError):
        family, quantized = None, False
    plain = not (config.get("target_parameters") or config.get("alpha_pattern") or quantized)
    lora_gguf = gguf == "ok" and plain and family is not None and family.gguf != "qwen3next"
    return Target(path, base, config, kwargs, gguf, lora_gguf)


def write_serving(
    model_dir: Path,
    names: list[str] | None = None,
    base: str | None = None,
    kwargs: dict | None = None,
    at: Path | None = None,
) -> Path:
    """Write SERVING.md into `model_dir` (every server unless `names`; the template arguments of the run
    recorded in `model_dir` unless `kwargs`; commands naming `at`, the final directory, when `model_dir` is
    a temporary one that will be renamed)."""
    path = model_dir / "SERVING.md"
    found = template_kwargs(model_dir) if kwargs is None else kwargs
    path.write_text(serving_md(model_dir, names or list(SERVERS), base, found, at), encoding="utf-8")
    return path


def _intro(adapter: bool, kwargs: dict) -> str:
    what = "a LoRA adapter on its base" if adapter else "a full model (merged or fully fine-tuned)"
    said = (
        f" It was trained with the template arguments `{json.dumps(kwargs)}`. They are that template's defaults"
        " (a request may still set them), and each command passes them as well, or says how to send them."
        if kwargs
        else ""
    )
    return (
        f"This directory holds {what}. Every command below serves it with the chat template that rendered "
        f"its training data (`chat_template.jinja` here) and the base's generation config.{said}"
    )


def _vllm(t: Target) -> list[str]:
    cmd = ["vllm serve", f"{t.base or t.path}"]
    if t.base:
        rank = next(r for r in VLLM_RANKS if r >= max_rank(t.config))
        cmd += [
            "--enable-lora",
            f"--lora-modules {t.path.name}={t.path}",
            f"--max-lora-rank {rank}",
            f"--chat-template {t.path / 'chat_template.jinja'}",
            f"--generation-config {t.path}",
        ]
    if t.kwargs:
        cmd.append(f"--default-chat-template-kwargs '{json.dumps(t.kwargs)}'")
    return [" \\\n  ".join(cmd)]


def _sglang(t: Target) -> list[str]:
    lines, served = [], t.path
    if t.base and t.config.get("use_rslora"):
        served = t.path.with_name(t.path.name + "-sglang")
        lines.append(f"qwen-ft export {t.path} --to adapter --for sglang --out {served}   # rsLoRA: alpha folded")
    cmd = ["python -m sglang.launch_server", f"--model-path {t.base or t.path}"]
    if t.base:
        cmd += [
            "--enable-lora",
            f"--lora-paths {t.path.name}={served}",
            f"--max-lora-rank {max_rank(t.config)}",
            f"--chat-template {t.path / 'chat_template.jinja'}",
        ]
    lines.append(" \\\n  ".join(cmd))
    if t.kwargs:
        lines.append(f'# send "chat_template_kwargs": {json.dumps(t.kwargs)} with each request')
    return lines


def _llama_cpp(t: Target) -> list[str]:
    flag = f" --chat-template-kwargs '{json.dumps(t.kwargs)}'" if t.kwargs else ""
    if t.base and t.lora_gguf:
        return [
            f"qwen-ft export {t.base} --to gguf --dtype q8_0 --out base.gguf",
            f"qwen-ft export {t.path} --to llama.cpp-lora --out {t.path.name}.gguf",
            f"llama-server -m base.gguf --lora {t.path.name}.gguf --jinja"
            f" --chat-template-file {t.path / 'chat_template.jinja'}{flag}",
        ]
    note = "   # merged into its base first" if t.base else ""
    return [
        f"qwen-ft export {t.path} --to gguf --dtype q8_0 --out {t.path.name}.gguf{note}",
        f"llama-server -m {t.path.name}.gguf --jinja{flag}",
    ]


def _ollama(t: Target) -> list[str]:
    note = "   # merged into its base first" if t.base else ""
    return [
        f"qwen-ft export {t.path} --to ollama --dtype q8_0 --out {t.path.name}-ollama{note}",
        f"cd {t.path.name}-ollama && ollama create {t.path.name} -f Modelfile",
    ]


COMMANDS = {"vllm": _vllm, "sglang": _sglang, "llama.cpp": _llama_cpp, "ollama": _ollama}


def export_adapter(adapter: str | Path, out: str | Path, server: str | None, overwrite: bool = False) -> Path:
    """`qwen-ft export ADAPTER --to adapter --for SERVER --out DIR`: see `write_adapter_for`, plus SERVING.md.

    Raises:
        QwenFtError: no --for, not an adapter, an --out that exists, or an adapter the server would serve wrong.
    """
    src, dest = Path(adapter), Path(out)
    if server is None:
        raise QwenFtError(f"--to adapter needs --for, one of {', '.join(SERVERS)}")
    if not (src / "adapter_config.json").is_file():
        raise QwenFtError(f"{src}: no adapter_config.json; --to adapter exports a LoRA adapter directory")
    if dest.exists() and not overwrite:
        raise QwenFtError(f"--out {dest} exists; choose a new directory, or pass --overwrite to replace it")
    if dest.resolve() == src.resolve():
        raise QwenFtError(f"--out {dest} is the adapter itself; choose a new directory")
    check_for(src, [server])
    config = adapter_config(src)
    shutil.rmtree(dest, ignore_errors=True)
    write_adapter_for(src, dest, server, config)
    write_serving(dest, [server], config["base_model_name_or_path"], template_kwargs(src))
    return dest
