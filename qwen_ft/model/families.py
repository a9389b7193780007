"""Model families: what qwen-ft knows about each, read from the checkpoint, never from its path.

One row per family; everything that differs between Qwen generations is a field here, so the rest of
the code asks the row instead of branching on names:

- `model_types`: the config.json `model_type`s of the family;
- `auto_class`: the transformers class that loads it whole. A composite vision-language checkpoint
  (Qwen3.5/3.6) is loaded as itself, so adapters, merged models and full fine-tunes keep its tensor
  names; `AutoModelForCausalLM` would load its language model alone under other names;
- `lora_targets`: every linear layer of the language model (LoRA's default);
- `embedding_modules`: what "LoRA (emb)" trains (input embeddings and output layer);
- `frozen`: module prefixes never trained (the vision tower): LoRA skips them, full fine-tuning
  leaves them out of the optimizer, outputs copy them from the base byte for byte;
- `unloaded`: tensor prefixes on disk that transformers does not load (multi-token prediction),
  copied from the base into every full-model output;
- `packing`: how packed rows are kept apart: "positions" (restarting position_ids / varlen
  attention) or "gdn" (also restart the Gated DeltaNet layers' conv and recurrent state, see
  `model/linear_attention.py`);
- `im_start_id`: the id of `<|im_start|>` in the family's vocabulary (a tokenizer of another
  generation is refused);
- `experts`: for a mixture of experts, the routed experts' fused 3-D parameters, named as peft's
  `target_parameters` matches them (transformers 5 fuses the experts, which are then not `nn.Linear`,
  so `target_modules` never reaches them); empty for dense families. The router (`ROUTER`) and the
  shared expert's gate are trained only when listed;
- `no_requantize`: why `qwen-ft quantize` cannot GPTQ-quantize the family ("" where it can);
- `gguf`: the GGUF architecture llama.cpp runs the family as (`qwen-ft export --to gguf`);
- `linears_by_weight`: linear layers adapted through their weight parameter (`gate_proj.weight`) rather
  than by module name: for Qwen3-MoE and Qwen3-Next, peft's transformers-4 compatibility rule turns the
  module targets gate_proj/up_proj/down_proj into the fused experts (at double rank), so the shared
  expert (and any dense MLP layer) would silently lose its adapter, in training and in stock peft alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen_ft.errors import QwenFtError


@dataclass(frozen=True)
class Family:
    """Per-family facts (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    lora_targets: tuple[str, ...]
    embedding_modules: tuple[str, ...] = ("embed_tokens", "lm_head")
    auto_class: str = "AutoModelForCausalLM"
    frozen: tuple[str, ...] = ()
    unloaded: tuple[str, ...] = ()
    packing: str = "positions"
    im_start_id: int = 151644
    experts: tuple[str, ...] = ()
    linears_by_weight: tuple[str, ...] = ()
    no_requantize: str = ""
    gguf: str = ""
    note: str = ""

    @property
    def moe(self) -> bool:
        """A mixture of experts (routed experts, a router and its load-balancing loss)."""
        return bool(self.experts)


QWEN2_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Gated DeltaNet's five projections; its conv1d, A_log and dt_bias are not linear layers (see docs/models.md)
GDN_LINEAR = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
# Qwen3-Next's Gated DeltaNet keeps q, k, v and z in one projection, b and a in another
NEXT_GDN_LINEAR = ("in_proj_qkvz", "in_proj_ba", "out_proj")
# transformers 5's fused routed experts: gate_up_proj [E, 2I, H] and down_proj [E, H, I]; the shared
# expert (gate_proj/up_proj/down_proj) is a plain MLP and is reached by the linear targets
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ROUTER = "mlp.gate.weight"  # the router's [E, H] weight: a parameter target too (trained only if listed)
MLP_LINEAR = ("gate_proj", "up_proj", "down_proj")


def _hybrid(name: str, model_types: tuple[str, ...], note: str, **layout) -> Family:
    """A Qwen3.5-generation row: Gated DeltaNet + gated attention layers, the 248k vocabulary."""
    return Family(name, model_types, QWEN2_LINEAR + GDN_LINEAR, packing="gdn", im_start_id=248045, note=note, **layout)


# gptqmodel 7.6 calibrates Qwen3.5-MoE's vision-language checkpoint as Qwen3-VL: chat messages through its
# image and video processor (torchvision), not token ids
VL_CALIBRATION = (
    "gptqmodel 7.6 calibrates this vision-language MoE checkpoint only through its image and video "
    "processor (torchvision), not with token ids"
)
# a composite Qwen3.5 checkpoint: the vision tower is never trained, mtp.* is not loaded
COMPOSITE = {"auto_class": "AutoModelForImageTextToText", "frozen": ("model.visual",), "unloaded": ("mtp",)}


FAMILIES = {
    "qwen2": Family("qwen2", ("qwen2",), QWEN2_LINEAR, gguf="qwen2", note="Qwen1.5, Qwen2, Qwen2.5"),
    "qwen3": Family("qwen3", ("qwen3",), QWEN2_LINEAR, gguf="qwen3", note="Qwen3 dense"),
    # Qwen v1 is trained after conversion to the native Qwen2 layout (qwen_ft.model.qwen_v1), so its
    # adapters target the native names, and it is exported as a GGUF from that conversion.
    "qwen": Family("qwen", ("qwen",), QWEN2_LINEAR, gguf="qwen2", note="Qwen v1 (QWenLMHeadModel)"),
    "qwen3_5": _hybrid(
        "qwen3_5", ("qwen3_5",), "Qwen3.5 / Qwen3.6 dense, vision-language checkpoint", gguf="qwen35", **COMPOSITE
    ),
    "qwen3_5_text": _hybrid(
        "qwen3_5_text", ("qwen3_5_text",), "Qwen3.5 / Qwen3.6 dense, text-only checkpoint", gguf="qwen35"
    ),
    # mixtures of experts: the linear targets reach attention (or GDN) and the shared expert
    "qwen2_moe": Family(
        "qwen2_moe", ("qwen2_moe",), QWEN2_LINEAR, experts=EXPERTS, gguf="qwen2moe", note="Qwen1.5-MoE, Qwen2-MoE"
    ),
    "qwen3_moe": Family(
        "qwen3_moe",
        ("qwen3_moe",),
        QWEN2_LINEAR,
        experts=EXPERTS,
        linears_by_weight=MLP_LINEAR,
        gguf="qwen3moe",
        note="Qwen3-MoE (30B-A3B, 235B-A22B, Coder-30B-A3B)",
    ),
    "qwen3_next": Family(
        "qwen3_next",
        ("qwen3_next",),
        QWEN2_LINEAR + NEXT_GDN_LINEAR,
        packing="gdn",
        experts=EXPERTS,
        linears_by_weight=MLP_LINEAR,
        unloaded=("mtp",),
        gguf="qwen3next",
        note="Qwen3-Next (80B-A3B)",
    ),
    "qwen3_5_moe": _hybrid(
        "qwen3_5_moe",
        ("qwen3_5_moe",),
        "Qwen3.5 / Qwen3.6 MoE, vision-language checkpoint",
        experts=EXPERTS,
        no_requantize=VL_CALIBRATION,
        gguf="qwen35moe",
        **COMPOSITE,
    ),
    "qwen3_5_moe_text": _hybrid(
        "qwen3_5_moe_text",
        ("qwen3_5_moe_text",),
        "Qwen3.5 / Qwen3.6 MoE, text-only checkpoint",
        experts=EXPERTS,
        gguf="qwen35moe",
    ),
}


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    """`name` (a module, parameter or tensor name) is one of the `prefixes` or lies below one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def checkpoint_model_type(path: str | Path) -> str:
    """`model_type` from the checkpoint's config.json ("qwen" for a Qwen v1 QWenLMHeadModel).

    Raises:
        QwenFtError: no readable config.json.
    """
    cfg_file = Path(path) / "config.json"
    try:
        config = json.loads(cfg_file.read_text())
        model_type = str(config["model_type"])
    except FileNotFoundError:
        raise QwenFtError(f"{cfg_file} not found; model.path must be a checkpoint directory") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise QwenFtError(f"{cfg_file}: cannot read model_type ({e})") from None
    return "qwen" if "QWenLMHeadModel" in (config.get("architectures") or []) else model_type


def supported() -> str:
    """The model types qwen-ft trains, with the models they are, for error messages."""
    return "; ".join(f"{', '.join(f.model_types)} ({f.note})" for f in FAMILIES.values())


def resolve_family(declared: str, path: str | Path) -> Family:
    """The family of the checkpoint at `path`; a declared family must agree with its config.json.

    Raises:
        QwenFtError: unknown model_type, or a declared family that contradicts the checkpoint.
    """
    model_type = checkpoint_model_type(path)
    found = _by_type(model_type)
    if found is None:
        raise QwenFtError(
            f"{path}/config.json: model_type {model_type!r} is not a model qwen-ft trains; supported: {supported()}"
        )
    if declared != "auto" and declared != found.name:
        raise QwenFtError(
            f"model.family: {declared!r} but {path}/config.json says model_type {model_type!r}; "
            f"set model.family: {found.name} (or auto)"
        )
    return found


def model_class(path: str | Path):
    """The transformers auto class that loads the checkpoint at `path` whole (see `Family.auto_class`)."""
    import transformers

    found = _by_type(checkpoint_model_type(path))
    return getattr(transformers, found.auto_class if found else "AutoModelForCausalLM")


def _by_type(model_type: str) -> Family | None:
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)
