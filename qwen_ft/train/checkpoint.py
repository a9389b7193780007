"""Self-describing, atomic checkpoints and resume.

A checkpoint directory holds the weights (a PEFT adapter, or a full model loadable by
`AutoModelForCausalLM.from_pretrained`), `run_config.yaml`, `manifest.json`, the tokenizer
files, and the resume state: `trainer_state.json`, `optimizer.safetensors` and
`rng.safetensors` (no pickles). It is written to a hidden temporary directory and renamed into
place only when complete, so a crash mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qwen_ft.model.fingerprint import model_fingerprint
from qwen_ft.model.layout import BaseLayout, add_base_tensors, trained_state
from qwen_ft.version import __version__

if TYPE_CHECKING:
    from qwen_ft.config.schema import MethodSpec, ModelConfig

STATE_FILE = "trainer_state.json"
CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Where training stands: optimizer steps done, position in the data, loss history."""

    step: int = 0
    epoch: int = 0
    batch_offset: int = 0  # micro-batches of `epoch` already consumed by this rank
    data_key: str = ""  # tokenized-data cache key: resuming on other data is refused
    data_inputs: dict = field(default_factory=dict)  # what the key is made of (data/tokenize.cache_inputs)
    history: list[dict] = field(default_factory=list)


def build_manifest(model: ModelConfig, method: MethodSpec, tokenizer_path: str, family: str, model_type: str) -> dict:
    """What produced these weights: base checkpoint, family, method, library versions."""
    import peft
    import transformers

    base, quant = Path(model.path).resolve(), method.quant
    return {
        "qwen_ft_version": __version__,
        "base_model": {"path": str(base), "fingerprint": model_fingerprint(base)},
        "family": family,
        "model_type": model_type,
        "method": method.name,
        "dtype": model.dtype,
        "tokenizer_path": str(Path(tokenizer_path).resolve()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "quant": None
        if method.name != "qlora"
        else {
            "backend": quant.backend,
            "bits": quant.bits,
            "quant_type": quant.quant_type,
            "double_quant": quant.double_quant,
            "original_base": str(Path(quant.original_base).resolve()) if quant.original_base else None,
        },
    }


def write_description(
    out: Path, cfg_yaml: str, manifest: dict, tok, template_text: str | None = None, kwargs: dict | None = None
) -> None:
    """run_config.yaml, manifest.json, the tokenizer files and what serving needs next to the weights:
    the chat template that rendered the data (`template_text`: a data.chat_template override, else the
    tokenizer's own) with the run's data.template_kwargs (`kwargs`) as its defaults, written as
    chat_template.jinja and into tokenizer_config.json (see `record_template`), the base's generation
    config with the end-of-turn ids, and for an adapter an absolute base path that stock AutoPeftModel
    resolves from anywhere."""
    from qwen_ft.data.template import find_template, record_template
    from qwen_ft.model.generation import write_generation_config

    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.yaml").write_text(cfg_yaml)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    tok.save_files(out)
    if template_text is None and kwargs:
        own = find_template(out)
        template_text = own.text if own else None
    if template_text is not None:
        record_template(out, template_text, kwargs)
    base = manifest["base_model"]["path"]
    write_generation_config(base, tok, out)
    adapter_config = out / "adapter_config.json"
    if adapter_config.is_file():
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = base
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_model_files(model, out: Path, state_dict: dict | None = None, base: BaseLayout | None = None) -> None:
    """Weights as safetensors: adapter files for a PeftModel, a full checkpoint otherwise.

    Training runs without the KV cache; a saved full model is for inference, so its config says
    use_cache: true. `state_dict` replaces the model's own tensors (weights gathered from ZeRO-3).
    With `base` (a composite checkpoint) a full model writes only what it trains and the base's
    other tensors are copied into it byte for byte (`model/layout.py`).
    """

    config = getattr(model, "config", None)
    before = getattr(config, "use_cache", None)
    full = not hasattr(model, "peft_config")
    if config is not None and full:
        config.use_cache = True
    if full and base is not None:
        state_dict = trained_state(state_dict if state_dict is not None else model.state_dict(), base.prefixes)
    try:
        # a preference run started from an adapter also holds that adapter frozen as its reference: not saved
        only = {} if full else {"selected_adapters": ["default"]}
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict, **only)
    finally:
        if config is not None:
            config.use_cache = before
    if full and base is not None:
        add_base_tensors(base.path, out, base.prefixes)


def compact_adapter(out: Path, dtype: torch.dtype) -> None:
    """Store an adapter's fully trained tensors (LoRA (emb)'s embeddings and output layer) in the training
    dtype, not as the fp32 masters training kept (half the size in bf16): stock peft casts them to its base's
    dtype on load anyway, so a bf16 base serves identical logits. Only final outputs: a checkpoint keeps
    the masters, so that a resumed run equals an uninterrupted one; a later stage started from this output
    (a preference run after SFT) starts from the rounded values, as serving does. (A tied output layer stays
    a second copy: peft 0.21 fails to load an adapter without it.)"""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = out / "adapter_model.safetensors"
    if not path.is_file() or dtype == torch.float32:
        return
    with safe_open(str(path), "pt") as st:  # cast one tensor at a time: no fp32 copy of them all beside
        full = [k for k in st.keys() if "lora_" not in k and st.get_slice(k).get_dtype() == "F32"]
        if not full:
            return
        tensors = {k: st.get_tensor(k).to(dtype) if k in full else st.get_tensor(k) for k in st.keys()}
    save_file(tensors, path, metadata={"format": "pt"})


def training_dtype(model) -> torch.dtype:
    """The dtype the frozen base computes in (fp32 when nothing frozen is floating point)."""
    return next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()), torch.float32)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {
        f"{i}.{k}": v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
        for i, state in sd["state"].items()
        for k, v in state.items()
    }
    return tensors, sd["param_groups"]


def save_rank_rng(out: Path, rank: int) -> None:
    """This process's RNG (CPU, and its own GPU's) as rng-rank{rank}.safetensors: each rank of a run draws
    its own dropout masks, so each must resume with its own state for the resumed run to equal the
    uninterrupted one (rank 0's is also in rng.safetensors)."""
    from safetensors.torch import save_file

    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(out / f"rng-rank{rank}.safetensors"))


def load_rank_rng(ckpt: Path, rank: int) -> None:
    """Restore what `save_rank_rng` saved (a checkpoint from before it was written keeps rank 0's state)."""
    from safetensors.torch import load_file

    path = ckpt / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        return
    rng = load_file(str(path))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def save_resume_state(out: Path, state: TrainState, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer moments, RNG states and TrainState, without pickle."""
    from safetensors.torch import save_file

    tensors, groups = _optimizer_tensors(optimizer)
    save_file(tensors, str(out / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(out / "rng.safetensors"))
    write_state_json(out, state, groups)


def write_state_json(out: Path, state: TrainState, param_groups: list | None = None) -> None:
    """trainer_state.json: the TrainState (and the optimizer's param groups when saved by qwen-ft)."""
    (out / STATE_FILE).write_text(json.dumps({**asdict(state), "param_groups": param_groups}, indent=1))


def read_state(ckpt: Path) -> TrainState:
    """The TrainState saved in `ckpt` (nothing else is loaded)."""
    meta = json.loads((ckpt / STATE_FILE).read_text())
    meta.pop("param_groups", None)
    return TrainState(**meta)


def load_resume_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore optimizer and RNG from `ckpt`; returns its TrainState.

    Raises:
        QwenFtError: the checkpoint's optimizer does not fit this run's trainable parameters.
    """
    from safetensors.torch import load_file

    from qwen_ft.errors import QwenFtError

    meta = json.loads((ckpt / STATE_FILE).read_text())
    groups = meta.pop("param_groups")
    flat = load_file(str(ckpt / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, value in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except ValueError as e:
        raise QwenFtError(
            f"{ckpt} was trained with other trainable parameters (method or lora settings differ: "
            f"{e}); resume with the checkpoint's settings (see its run_config.yaml)"
        ) from None
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))])
    return TrainState(**meta)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
