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
    reads_adapter_template: bool  # uses chat_template.jinja from the adapter's directory


SERVERS = {
    "vllm": Server("vllm", rslora=True, dora=False, embeddings=False, max_rank=512, reads_adapter_template=False),
    "sglang": Server(
        "sglang", rslora=False, dora=False, embeddings=False, max_rank=None, reads_adapter_template=False
    ),
    "llama.cpp": Server(
        "llama.cpp", rslora=False, dora=False, embeddings=False, max_rank=None, reads_adapter_template=False
    ),
    "ollama": Server(
        "ollama", rslora=False, dora=False, embeddings=False, max_rank=None, reads_adapter_template=False
    ),
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
    if server.max_rank is not None and max_rank(config) > server.max_rank:
        found.append(f"its rank {max_rank(config)} is above the {server.max_rank} it accepts")
    return found


def check_for(adapter: Path, names: list[str]) -> None:
    """Refuse, naming each reason and the alternative, an adapter some chosen server would serve wrong.

    Raises:
        QwenFtError: one message for every server that cannot serve it.
    """
    config = adapter_config(adapter)
    bad = {name: problems(config, SERVERS[name]) for name in names}
    lines = [f"{name}: {'; '.join(why)}" for name, why in bad.items() if why]
    if lines:
        raise QwenFtError(
            f"{adapter} cannot be served as trained by "
            + " | ".join(lines)
            + f". Merge it first (qwen-ft merge {adapter} --out DIR) and serve the merged model"
        )


def fold_rslora(config: dict) -> dict:
    """The same adapter under plain alpha / r scaling: alpha' = alpha * sqrt(r) per layer, so that
    alpha' / r = alpha / sqrt(r) (rsLoRA's scale). Configs without rsLoRA are returned unchanged."""
    if not config.get("use_rslora"):
        return config
    ranks = config.get("rank_pattern") or {}
    alphas = config.get("alpha_pattern") or {}
    folded_alphas = {k: alphas.get(k, config["lora_alpha"]) * math.sqrt(r) for k, r in ranks.items()}
    folded_alphas.update({k: a * math.sqrt(ranks.get(k, config["r"])) for k, a in alphas.items()})
    return {
        **config,
        "use_rslora": False,
        "lora_alpha": config["lora_alpha"] * math.sqrt(config["r"]),
        "alpha_pattern": folded_alphas,
    }


def write_adapter_for(adapter: Path, out: Path, name: str) -> Path:
    """A copy of `adapter` that `name` serves as trained (rsLoRA folded where the server needs it)."""
    check_for(adapter, [name])
    shutil.copytree(adapter, out)
    config = adapter_config(adapter)
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


def serving_md(model_dir: Path, names: list[str], base: str | None, kwargs: dict) -> str:
    """SERVING.md: the exact command per server for the model (or adapter on `base`) in `model_dir`, trained
    with the template arguments `kwargs`."""
    adapter = base is not None
    config = adapter_config(model_dir) if adapter else {}
    lines = [f"# Serving {model_dir.name}", "", _intro(adapter, kwargs), ""]
    for name in names:
        why = problems(config, SERVERS[name]) if adapter else []
        lines += [f"## {name}", ""]
        if why:
            lines += [
                f"Not servable as trained: {'; '.join(why)}. Merge it first:",
                "",
                "```bash",
                f"qwen-ft merge {model_dir} --out {model_dir}-merged",
                "```",
                "",
            ]
            continue
        lines += ["```bash", *COMMANDS[name](model_dir, base, config, kwargs), "```", ""]
    return "\n".join(lines)


def write_serving(
    model_dir: Path, names: list[str] | None = None, base: str | None = None, kwargs: dict | None = None
) -> Path:
    """Write SERVING.md into `model_dir` (every server unless `names`; the template arguments of the run
    recorded in `model_dir` unless `kwargs`)."""
    path = model_dir / "SERVING.md"
    found = template_kwargs(model_dir) if kwargs is None else kwargs
    path.write_text(serving_md(model_dir, names or list(SERVERS), base, found), encoding="utf-8")
    return path


def _intro(adapter: bool, kwargs: dict) -> str:
    what = "a LoRA adapter on its base" if adapter else "a full model (merged or fully fine-tuned)"
    said = (
        f" It was trained with the template arguments `{json.dumps(kwargs)}`: each command passes them"
        " (or says how to send them with each request)."
        if kwargs
        else ""
    )
    return (
        f"This directory holds {what}. Every command below serves it with the chat template that rendered "
        f"its training data (`chat_template.jinja` here) and the base's generation config.{said}"
    )


def _vllm(d: Path, base: str | None, config: dict, kwargs: dict) -> list[str]:
    cmd = ["vllm serve", f"{base if base else d}"]
    if base:
        rank = next(r for r in VLLM_RANKS if r >= max_rank(config))
        cmd += [
            "--enable-lora",
            f"--lora-modules {d.name}={d}",
            f"--max-lora-rank {rank}",
            f"--chat-template {d / 'chat_template.jinja'}",
            f"--generation-config {d}",
        ]
    if kwargs:
        cmd.append(f"--default-chat-template-kwargs '{json.dumps(kwargs)}'")
    return [" \\\n  ".join(cmd)]


def _sglang(d: Path, base: str | None, config: dict, kwargs: dict) -> list[str]:
    lines = []
    served = d
    if base and config.get("use_rslora"):
        served = d.with_name(d.name + "-sglang")
        lines.append(f"qwen-ft export {d} --to adapter --for sglang --out {served}   # rsLoRA: alpha folded")
    cmd = ["python -m sglang.launch_server", f"--model-path {base if base else d}"]
    if base:
        cmd += [
            "--enable-lora",
            f"--lora-paths {d.name}={served}",
            f"--max-lora-rank {max_rank(config)}",
            f"--chat-template {d / 'chat_template.jinja'}",
        ]
    lines.append(" \\\n  ".join(cmd))
    if kwargs:
        lines.append(f'# send "chat_template_kwargs": {json.dumps(kwargs)} with each request')
    return lines


def _llama_cpp(d: Path, base: str | None, config: dict, kwargs: dict) -> list[str]:
    flag = f" --chat-template-kwargs '{json.dumps(kwargs)}'" if kwargs else ""
    if not base:
        return [
            f"qwen-ft export {d} --to gguf --dtype q8_0 --out {d.name}.gguf",
            f"llama-server -m {d.name}.gguf --jinja{flag}",
        ]
    if config.get("target_parameters") or config.get("alpha_pattern"):  # no GGUF LoRA for these: merged
        return [
            f"qwen-ft export {d} --to gguf --dtype q8_0 --out {d.name}.gguf   # merged into its base first",
            f"llama-server -m {d.name}.gguf --jinja{flag}",
        ]
    return [
        f"qwen-ft export {base} --to gguf --dtype q8_0 --out base.gguf",
        f"qwen-ft export {d} --to llama.cpp-lora --out {d.name}.gguf",
        f"llama-server -m base.gguf --lora {d.name}.gguf --jinja"
        f" --chat-template-file {d / 'chat_template.jinja'}{flag}",
    ]


def _ollama(d: Path, base: str | None, config: dict, kwargs: dict) -> list[str]:
    note = "   # the adapter merged into its base first" if base else ""
    return [
        f"qwen-ft export {d} --to gguf --dtype q8_0 --out {d.name}.gguf{note}",
        f"printf 'FROM ./{d.name}.gguf\\n' > Modelfile   # the template is read from the GGUF",
        f"ollama create {d.name} -f Modelfile",
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
    shutil.rmtree(dest, ignore_errors=True)
    write_adapter_for(src, dest, server)
    write_serving(dest, [server], adapter_config(src)["base_model_name_or_path"], template_kwargs(src))
    return dest
