"""Quantized bases for Q-LoRA: bitsandbytes 4-bit (quantized on load) or an existing GPTQ checkpoint.

bitsandbytes and gptqmodel are imported here lazily and required through `qwen_ft.deps`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwen_ft import deps
from qwen_ft.errors import QwenFtError
from qwen_ft.model.load import DTYPES, Precision, enable_gradient_checkpointing

if TYPE_CHECKING:
    from qwen_ft.config.schema import ModelConfig, QuantConfig


def compute_dtype(quant: QuantConfig, precision: Precision) -> torch.dtype:
    """quant.compute_dtype, `auto` meaning the run's precision."""
    name = quant.compute_dtype
    return precision.dtype if name == "auto" else DTYPES[name]


def gptq_settings(path: str | Path) -> dict | None:
    """The GPTQ quantization settings stored with a checkpoint (config.json or quantize_config.json), or None."""
    root = Path(path)
    config = json.loads((root / "config.json").read_text()) if (root / "config.json").is_file() else {}
    found = config.get("quantization_config")
    if found is None and (root / "quantize_config.json").is_file():
        found = json.loads((root / "quantize_config.json").read_text())
    if found and str(found.get("quant_method", "gptq")).lower() == "gptq":
        return found
    return None


def _disable_cpu_repack(model) -> None:
    """Stop bnb's Linear4bit from repacking weights for the CPU bf16 path on eval-mode forwards.

    On CPU an eval-mode forward (eval loss, merge probe) repacks the 4-bit weights into a layout
    the training kernels cannot read, and the next training step fails; keep the training layout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _device_map(device: torch.device) -> dict | None:
    """Place the quantized base on `device`, except under ZeRO-3, which partitions it itself."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return None if is_deepspeed_zero3_enabled() else {"": str(device)}


def load_bnb_base(base: ModelConfig, q: QuantConfig, precision: Precision, attn: str, device: torch.device):
    """Load model.path quantized to 4 bits by bitsandbytes (nf4/fp4, optional double quantization)."""
    deps.require("bnb", "method=qlora with quant.backend=bnb")
    from transformers import BitsAndBytesConfig

    from qwen_ft.model.families import model_class, resolve_family

    dtype = compute_dtype(q, precision)
    # a composite checkpoint's vision tower is not trained: it stays as it is, unquantized
    frozen = list(resolve_family(base.family, base.path).frozen)  # matched from the module name's start
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
        llm_int8_skip_modules=["lm_head", *frozen] if frozen else None,
    )
    model = model_class(base.path).from_pretrained(
        base.path,
        quantization_config=config,
        dtype=dtype,
        attn_implementation=attn,
        device_map=_device_map(device),
        local_files_only=True,
        trust_remote_code=base.trust_remote_code,
    )
    _disable_cpu_repack(model)
    return model


def quantize_experts(model, quant: QuantConfig, path: str, precision: Precision):
    """The fused routed experts of a mixture of experts quantized too, after peft has wrapped them (peft
    sizes its per-expert adapters from their 3-D shape): on a bitsandbytes base packed to 4 bits
    (model/experts_4bit.py), on a GPTQ base replaced by the checkpoint's per-expert quantized linears
    (model/gptq_experts.py). `model` unchanged otherwise."""
    from qwen_ft.model import experts, experts_4bit, gptq_experts

    found = experts.expert_modules(model)
    if not found:
        return model
    experts.never_a_loop(model)
    dtype = compute_dtype(quant, precision)
    if quant.backend == "bnb":
        experts_4bit.quantize(model, found, quant, dtype)
    else:
        gptq_experts.attach(model, found, path, gptq_settings(path) or {}, dtype)
    experts.install_lora_experts(model)  # quantized experts run only through qwen-ft's grouped forward
    return model


def load_gptq_base(base: ModelConfig, quant: QuantConfig, precision: Precision, attn: str, device: torch.device):
    """Load an existing GPTQ checkpoint through transformers + gptqmodel with a kernel that can train.

    Raises:
        QwenFtError: model.path holds no GPTQ quantization settings.
    """
    deps.require("gptq", "method=qlora with quant.backend=gptq")
    settings = gptq_settings(base.path)
    if settings is None:
        raise QwenFtError(
            f"quant.backend=gptq but {base.path} has no GPTQ quantization_config "
            "(config.json) or quantize_config.json; use quant.backend=bnb for a full-precision base"
        )
    return from_gptq_checkpoint(
        base.path,
        int(settings.get("bits", quant.bits)),
        compute_dtype(quant, precision),
        _device_map(device),
        attn_implementation=attn,
        trust_remote_code=base.trust_remote_code,
    )


def from_gptq_checkpoint(path: str | Path, bits: int, dtype: torch.dtype, device_map: dict | None, **kwargs):
    """transformers' load of the GPTQ checkpoint at `path` with the torch kernel (the one that can
    back-propagate, and runs on CPU; exllama cannot), checked by `every_weight_loaded`.

    Only the linear layers the checkpoint holds quantized (a `qweight` on disk) become GPTQ layers:
    transformers would otherwise convert every linear layer of the blocks, and leave the ones gptqmodel
    kept in full precision (Qwen2-MoE's one-output `shared_expert_gate`) uninitialised.
    """
    from transformers import AutoConfig, GPTQConfig

    from qwen_ft.model.families import model_class
    from qwen_ft.model.layout import tensor_files

    quantized = [[n.removesuffix(".qweight") for n in sorted(tensor_files(path)) if n.endswith(".qweight")]]
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=kwargs.get("trust_remote_code"))
    if isinstance(getattr(config, "quantization_config", None), dict):  # what transformers loads by
        config.quantization_config["modules_in_block_to_quantize"] = quantized
    gptq = GPTQConfig(bits=bits, backend="torch", use_exllama=False, modules_in_block_to_quantize=quantized)
    # a composite checkpoint (Qwen3.5) loads whole, as itself: its tensor names are the module names
    loaded: Any = model_class(path).from_pretrained(
        path,
        config=config,
        quantization_config=gptq,
        dtype=dtype,
        device_map=device_map,
        local_files_only=True,
        output_loading_info=True,
        **kwargs,
    )
    return every_weight_loaded(path, *loaded)


def every_weight_loaded(path: str | Path, model, info: dict):
    """`model`, once transformers has filled every weight from the checkpoint at `path` but the fused
    routed experts of a GPTQ mixture of experts.

    transformers 5 loads a GPTQ MoE's per-expert quantized linears into nothing: its fused experts stay
    at their random initialisation (reported MISSING, the quantized tensors UNEXPECTED) and the model
    runs. Those are filled by qwen-ft from the per-expert tensors (model/gptq_experts.py), once the
    checkpoint is checked to hold them; any other weight left uninitialised is refused.

    Raises:
        QwenFtError: naming what was left uninitialised, or experts not quantized per expert.
    """
    from qwen_ft.model.gptq_experts import PARTS, layout_problem
    from qwen_ft.model.layout import tensor_files

    text = model.config.get_text_config()
    tied = {"lm_head.weight"} if text.tie_word_embeddings else set()
    missing = sorted(set(info.get("missing_keys") or ()) - tied)
    fused = [m for m in missing if m.rsplit(".", 2)[-2:] in [["experts", p] for p in PARTS]]
    if fused:
        problem = layout_problem(
            tensor_files(path), sorted({m.rsplit(".", 1)[0] for m in fused}), int(text.num_experts), str(path)
        )
        if problem:
            raise QwenFtError(problem)
    missing = [m for m in missing if m not in fused]
    if missing:
        raise QwenFtError(
            f"{path}: transformers left {len(missing)} weights of {type(model).__name__} at their "
            f"random initialisation ({', '.join(missing[:3])}, ...): the checkpoint's tensors "
            f"({', '.join(sorted(info.get('unexpected_keys') or ())[:2])}, ...) do not fit them; "
            "use the original-precision checkpoint"
        )
    return model


def prepare_for_kbit(model, checkpoint_fraction: float):
    """Freeze the quantized base; non-reentrant checkpointing (of that share of layers) with input grads.

    Unlike peft's prepare_model_for_kbit_training, the frozen full-precision parts (embeddings,
    output layer, norms) stay in the compute dtype: the forward runs under autocast, which casts
    fp32 copies back down for every matmul, so the upcast costs memory (2.5 GB at 7B) and a cast
    per step for nothing. What is trained is fp32 (`adapters.trainable_in_fp32`).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpoint_fraction > 0:
        enable_gradient_checkpointing(model, True, checkpoint_fraction)
    model.config.use_cache = False
    return model
