"""Checks of a config against the checkpoint it names (read from config.json, nothing loaded).

Combinations the stack cannot train correctly are refused here, before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qwen_ft.model.quant import gptq_settings

if TYPE_CHECKING:
    from qwen_ft.config.schema import MethodSpec, ModelConfig
    from qwen_ft.model.families import Family
    from qwen_ft.tokenizer import ChatTokenizer


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def pickle_weights_problem(path: str | Path, where: str, opt_in: str) -> str | None:
    """A message when the directory's weights exist only as torch pickles (.bin), which load through
    torch.load and can run code; None when it has safetensors (or no weights at all)."""
    d = Path(path)
    if not d.is_dir() or any(d.glob("*.safetensors")):
        return None
    pickles = sorted(f.name for f in d.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if not pickles:
        return None
    return (
        f"{where}: {d} holds only pickle weights ({', '.join(pickles[:3])}), which qwen-ft does not load by "
        "default (torch.load can run code); convert them to safetensors (save_pretrained(..., "
        f"safe_serialization=True) where you trust the files), or {opt_in}"
    )


def location_problems(model: ModelConfig, tokenizer_path: str, need_model: bool = True) -> list[str]:
    """model.path and the tokenizer directory must be local directories."""
    problems = []
    if need_model and not Path(model.path).is_dir():
        problems.append(f"model.path: {model.path!r} is not a directory; point it at a local checkpoint")
    if not Path(tokenizer_path).is_dir():
        problems.append(f"tokenizer.path: {tokenizer_path!r} is not a directory (defaults to model.path)")
    return problems


def checkpoint_problems(base: ModelConfig, method: MethodSpec, zero3: str | None) -> list[str]:
    """Problems between the method (with its lora/quant settings) and the checkpoint at model.path;
    `zero3`: the dist.deepspeed setting when it is ZeRO-3, else None."""
    if not (Path(base.path) / "config.json").is_file():
        return []  # reported by the environment check
    unreadable = _config_json_problem(base.path)
    if unreadable:
        return [unreadable]
    if not base.allow_pickle_weights:
        dirs = [("model.path", base.path), ("quant.original_base", method.quant.original_base)]
        found = [pickle_weights_problem(p, key, "set model.allow_pickle_weights: true") for key, p in dirs if p]
        if any(found):
            return [f for f in found if f]
    if base.trust_remote_code:
        return [_remote_code_problem(base)]
    gptq = gptq_settings(base.path)
    family = _family_or_none(base.path)  # an unknown type is reported by the family check itself
    if method.adapter and method.name != "full":
        from qwen_ft.model.start_adapter import adapter_problems

        unusable = adapter_problems(method.adapter, method.lora)
        if unusable:
            return unusable
    targets = _target_problems(method, base.path, family) + _hybrid_problems(base, method, family)
    targets += _host_embedding_problems(base, family)
    targets += _moe_quant_problems(method, base.path, family, zero3)
    if method.name == "qlora":
        return targets + _qlora_problems(method, base.path, gptq)
    if gptq is not None:
        return [
            f"model.path: {base.path} is a GPTQ checkpoint, whose weights cannot be trained directly; "
            "use method=qlora with quant.backend=gptq (or a full-precision checkpoint)"
        ]
    return targets


def _host_embedding_problems(base: ModelConfig, family) -> list[str]:
    """model.host_embedding needs an output layer of its own and a text-only checkpoint."""
    if not base.host_embedding:
        return []
    from transformers import AutoConfig

    try:  # a key left out of config.json means the config class's default
        config = AutoConfig.from_pretrained(base.path)
        tied = config.tie_word_embeddings or config.get_text_config().tie_word_embeddings
    except (ValueError, OSError, KeyError):  # Qwen v1 (remote code): its config.json says it
        import json

        tied = json.loads((Path(base.path) / "config.json").read_text()).get("tie_word_embeddings", False)
    why = []
    if tied:
        why.append("ties its output layer to the input embedding, which must then stay on the device")
    if family is not None and family.frozen:
        why.append("is a composite (vision-language) checkpoint")
    return (
        [f"model.host_embedding: true, but {base.path} {' and '.join(why)}; set model.host_embedding: false"]
        if why
        else []
    )


def _config_json_problem(path: str) -> str | None:
    """config.json must be a JSON object with a model_type (everything after reads it)."""
    import json

    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return f"model.path: {file} is not valid JSON ({e}); restore the checkpoint's config.json"
    if not isinstance(config, dict) or "model_type" not in config:
        return f"model.path: {file} has no model_type; restore the checkpoint's config.json"
    return None


def module_names(path: str | Path) -> set[str]:
    """Dotted module names that own weights in the checkpoint's safetensors (headers only, nothing loaded)."""
    from safetensors import safe_open

    names = set()
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "np") as fh:
            names |= {k.rsplit(".", 1)[0] for k in fh.keys()}
    return names


def _family_or_none(path: str) -> Family | None:
    from qwen_ft.errors import QwenFtError
    from qwen_ft.model.families import resolve_family

    try:
        return resolve_family("auto", path)
    except QwenFtError:
        return None


def _target_problems(method: MethodSpec, path: str, family: Family | None) -> list[str]:
    """lora.target_modules must each name modules (peft matches by name suffix) or, on a mixture of
    experts, parameters of this checkpoint; parameter targets take no LoRA dropout."""
    lo = method.lora
    if method.name == "full" or family is None:
        return []
    from qwen_ft.model.experts import split_targets

    problems = []
    if lo.dropout and split_targets(lo.target_modules, family)[1]:
        problems.append(
            f"lora.dropout: {lo.dropout} with the routed experts (or router) adapted: peft's "
            "target_parameters adapters (ParamWrapper) cannot apply dropout, since the adapter is added "
            "to the weight, not to the layer's output; set lora.dropout: 0 (or leave it unset), or leave "
            "the experts out of lora.target_modules"
        )
    if not lo.target_modules:
        return problems
    modules, parameters = _loaded_names(path, family)
    if not modules:
        return problems  # no safetensors to read names from (a v1 directory is converted first)
    found = (_unmatched(t, path, modules, parameters) for t in lo.target_modules)
    return problems + [p for p in found if p]


def _loaded_names(path: str, family: Family) -> tuple[set[str], set[str]]:
    """(module names, parameter-target names) of the checkpoint as transformers loads it (a vision tower
    left out: it is never adapted)."""
    from qwen_ft.model.experts import fused_names
    from qwen_ft.model.families import under

    names = {n for n in module_names(path) if not under(n, family.frozen)}
    return fused_names(names) if family.moe else (names, set())


def _unmatched(target: str, path: str, modules: set[str], parameters: set[str]) -> str | None:
    """The problem with one target entry, or None when it names something."""
    import difflib

    from qwen_ft.model.experts import is_parameter_target

    pool = parameters if is_parameter_target(target) else modules
    if any(n == target or n.endswith("." + target) for n in pool):
        return None
    if is_parameter_target(target):
        if not parameters:
            return (
                f"lora.target_modules: {target!r} names a parameter, but {path} is not a mixture of experts; "
                "name its linear layers instead"
            )
        import re

        listed = sorted({re.sub(r"^.*layers\.\d+\.", "", n) for n in parameters})  # once, not per layer
        return (
            f"lora.target_modules: {target!r} names no expert parameter of {path}; its parameter targets are "
            f"{', '.join(listed)}"
        )
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules})
    close = difflib.get_close_matches(target, leaves, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if any(n.endswith(f".{target}.weight") for n in parameters):  # the router: no linear layer in transformers 5
        hint = f" (the router is a parameter here: name it mlp.{target}.weight)"
    return (
        f"lora.target_modules: {target!r} names no module of {path}{hint}; its layers are named "
        f"{', '.join(n for n in leaves if not n.isdigit())[:300]}"
    )


def _hybrid_problems(base: ModelConfig, method: MethodSpec, family: Family | None) -> list[str]:
    """Setups not yet proven on the Gated DeltaNet families, refused rather than run unchecked."""
    if family is None or family.packing != "gdn":
        return []
    problems = []
    if method.name == "qlora" and method.quant.backend == "gptq":
        problems.append(
            f"quant.backend=gptq with {base.path}, {family.note}: GPTQ bases of this family are not "
            "supported yet; use quant.backend=bnb on the full-precision checkpoint"
        )
    if base.compile:
        problems.append(
            f"model.compile: true with {family.note}: compiling its layers is not checked yet (packed "
            "batches change the Gated DeltaNet layout from batch to batch); set model.compile: false"
        )
    return problems


def _moe_quant_problems(method: MethodSpec, path: str, family: Family | None, zero3: str | None) -> list[str]:
    """Q-LoRA on a mixture of experts quantizes the routed experts too. bitsandbytes packs them after
    loading (model/experts_4bit.py), which ZeRO-3 would already have partitioned; a GPTQ base must hold
    them as per-expert quantized linears (model/gptq_experts.py), checked from the tensor names."""
    if family is None or not family.moe or method.name != "qlora":
        return []
    if method.quant.backend == "bnb" and not zero3:
        return []
    if method.quant.backend == "bnb":
        return [
            f"method=qlora with dist.deepspeed={zero3} (ZeRO-3) on {family.note}: ZeRO-3 partitions the "
            "fused experts while loading, before qwen-ft can quantize them to 4 bits; use dist.deepspeed=zero2 (each "
            "GPU holds the 4-bit model) or method=lora with ZeRO-3"
        ]
    return _gptq_experts_problems(path)


def _gptq_experts_problems(path: str) -> list[str]:
    import json
    import re

    from qwen_ft.errors import QwenFtError
    from qwen_ft.model.gptq_experts import bits_of, layout_problem
    from qwen_ft.model.layout import tensor_files

    settings = gptq_settings(path)
    if settings is None:
        return []  # reported by the Q-LoRA checks
    try:
        bits_of(settings)
    except QwenFtError as e:
        return [str(e)]
    files = tensor_files(path)
    # every routed-experts module on disk, whether per expert (experts.3.gate_proj.*) or fused (experts.gate_up_proj)
    prefixes = sorted({m[1] for m in (re.match(r"(.*\.mlp\.experts)\.", n) for n in files) if m})
    config = json.loads((Path(path) / "config.json").read_text())
    config = config.get("text_config") or config
    # Qwen's checkpoints say num_experts; transformers 5.25 writes num_local_experts
    experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    if prefixes and not experts:
        return [f"model.path {path}/config.json: a mixture of experts without num_experts (or num_local_experts)"]
    problem = layout_problem(files, prefixes, experts, f"model.path {path}")
    return [problem] if problem else []


def _remote_code_problem(model: ModelConfig) -> str:
    """trust_remote_code never overrides a family rule: every family qwen-ft trains loads natively."""
    from qwen_ft.errors import QwenFtError
    from qwen_ft.model.families import resolve_family

    try:
        family = resolve_family("auto", model.path).name
    except QwenFtError as e:
        return f"model.trust_remote_code: true, but {e}"
    how = "is converted to the native Qwen2 layout" if family == "qwen" else "is supported by transformers natively"
    return (
        f"model.trust_remote_code: true with {model.path}, a {family} checkpoint, which {how}; "
        "set model.trust_remote_code: false (qwen-ft runs no checkpoint code)"
    )


def _qlora_problems(method: MethodSpec, path: str, gptq: dict | None) -> list[str]:
    q, problems = method.quant, []
    if q.backend == "gptq" and gptq is None:
        problems.append(
            f"quant.backend=gptq but {path} has no GPTQ quantization_config; "
            "use quant.backend=bnb to quantize a full-precision checkpoint on load"
        )
    if q.backend == "bnb" and gptq is not None:
        problems.append(f"quant.backend=bnb but {path} is already GPTQ-quantized; use quant.backend=gptq")
    if q.backend == "gptq" and gptq is not None:
        if int(gptq.get("bits", q.bits)) != q.bits:
            problems.append(
                f"quant.bits: {q.bits} but the checkpoint is {gptq.get('bits')}-bit GPTQ; "
                f"set quant.bits={gptq.get('bits')}"
            )
        if method.lora.train_embeddings and gptq.get("lm_head"):
            problems.append(
                "lora.train_embeddings: true but this GPTQ checkpoint quantizes lm_head, which cannot "
                "be trained; set lora.train_embeddings=false"
            )
    if method.name == "qlora" and q.original_base and not (Path(q.original_base) / "config.json").is_file():
        problems.append(f"quant.original_base: {q.original_base!r} is not a checkpoint directory")
    return problems


def check_vocabulary(family: Family, tok: ChatTokenizer, tokenizer_dir: str, model_dir: str) -> None:
    """The tokenizer must be the family's vocabulary: a Qwen3 tokenizer on a Qwen3.5 model (or the
    reverse) gives ids that mean other tokens there, and would train garbage without any error.

    Raises:
        QwenFtError: naming both directories and the fix.
    """
    from qwen_ft.errors import QwenFtError
    from qwen_ft.model.families import FAMILIES

    if tok.im_start_id == family.im_start_id:
        return
    owners = sorted({f.note for f in FAMILIES.values() if f.im_start_id == tok.im_start_id}) or ["another model"]
    raise QwenFtError(
        f"tokenizer {tokenizer_dir} is the vocabulary of {' / '.join(owners)} (<|im_start|> = "
        f"{tok.im_start_id}), but {model_dir} is {family.note} (<|im_start|> = {family.im_start_id}); "
        "point tokenizer.path at the checkpoint's own tokenizer files (or leave it unset)"
    )
