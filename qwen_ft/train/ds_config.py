"""DeepSpeed configuration with the YAML as the one source of truth.

Presets are built in (`preset`: zero2, zero3 and their CPU-offload variants), so they work from an
installed wheel; `configs/deepspeed/` holds the same as JSON to copy and edit. Values that
also exist in the YAML (micro-batch size, accumulation, clipping, precision) are filled from it;
a user JSON may leave them as "auto" or repeat the same value, anything else is refused. A
`scheduler` or `optimizer` block is refused: the learning-rate schedule and AdamW come from the
YAML, so DeepSpeed can never silently replace them (QwenLM's WarmupLR did exactly that).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_ft.config.validate import DEEPSPEED_PRESETS
from qwen_ft.errors import ConfigError

if TYPE_CHECKING:
    from qwen_ft.config.schema import DistConfig, TrainConfig

PRESETS = tuple(p for p in DEEPSPEED_PRESETS if p != "none")
_OFFLOAD = {"device": "cpu", "pin_memory": True}


def preset(name: str) -> dict:
    """A built-in DeepSpeed config: the YAML fills every "auto" (see `owned_values`)."""
    zero: dict = {"stage": 3 if name.startswith("zero3") else 2, "overlap_comm": True, "contiguous_gradients": True}
    if zero["stage"] == 2:
        zero.update(reduce_scatter=True, allgather_bucket_size=200_000_000, reduce_bucket_size=200_000_000)
    else:
        zero.update(
            reduce_bucket_size=200_000_000,
            stage3_prefetch_bucket_size=50_000_000,
            stage3_param_persistence_threshold=100_000,
            stage3_max_live_parameters=1_000_000_000,
            stage3_max_reuse_distance=1_000_000_000,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if name.endswith("_offload"):
        zero["offload_optimizer"] = dict(_OFFLOAD)
        if zero["stage"] == 3:
            zero["offload_param"] = dict(_OFFLOAD)
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def read_base(choice: str) -> tuple[dict, str]:
    """The preset or user JSON named by dist.deepspeed, and where it came from.

    Raises:
        ConfigError: missing or unreadable file.
    """
    if choice in PRESETS:
        return preset(choice), f"built-in preset {choice}"
    path = Path(choice)
    try:
        return json.loads(path.read_text()), str(path)
    except FileNotFoundError:
        raise ConfigError(
            [f"dist.deepspeed: {path} not found; use a preset ({', '.join(PRESETS)}) or a JSON path"]
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError([f"dist.deepspeed: {path}:{e.lineno}: invalid JSON ({e.msg})"]) from None


def owned_values(t: TrainConfig, precision: str, world: int) -> dict[tuple[str, ...], object]:
    """The DeepSpeed keys whose values come from the YAML's train section."""
    return {
        ("train_micro_batch_size_per_gpu",): t.micro_batch_size,
        ("gradient_accumulation_steps",): t.grad_accum,
        ("train_batch_size",): t.micro_batch_size * t.grad_accum * world,
        ("gradient_clipping",): t.max_grad_norm,
        ("bf16", "enabled"): precision == "bf16",
        ("fp16", "enabled"): precision == "fp16",
    }


def deepspeed_config(dist: DistConfig, train: TrainConfig, precision: str, world: int) -> dict:
    """The DeepSpeed config for this run.

    Raises:
        ConfigError: every conflict between the JSON and the YAML, at once.
    """
    base, source = read_base(dist.deepspeed)
    out, problems = copy.deepcopy(base), []
    for block in ("scheduler", "optimizer"):
        if block in base:
            problems.append(
                f"{source}: remove the '{block}' block; train.scheduler / train.learning_rate and AdamW "
                "settings in the YAML are the only source of truth"
            )
    for path, value in owned_values(train, precision, world).items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        given = node.get(path[-1], "auto")
        if given not in ("auto", value):
            problems.append(
                f"{source}: {'.'.join(path)} is {given!r} but the YAML makes it {value!r}; "
                'set it to "auto" (or remove it)'
            )
        node[path[-1]] = value
    if problems:
        raise ConfigError(problems, source=source)
    return out


def zero_stage(ds_config: dict) -> int:
    """ZeRO stage of a DeepSpeed config (0 when absent)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def json_stage(path: str) -> int:
    """ZeRO stage of a user DeepSpeed JSON (0 when unreadable: `deepspeed_config` reports that later)."""
    try:
        return zero_stage(json.loads(Path(path).read_text()))
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def is_zero3_json(dist: DistConfig) -> bool:
    """dist.deepspeed is a readable JSON with stage 3 (the presets' stage is the config's own shape)."""
    ds = dist.deepspeed
    return ds.endswith(".json") and Path(ds).is_file() and json_stage(ds) == 3


def is_zero3(dist: DistConfig) -> bool:
    """dist.deepspeed is a ZeRO-3 preset or a readable JSON with stage 3."""
    return dist.deepspeed in ("zero3", "zero3_offload") or is_zero3_json(dist)


def offloads_optimizer(ds_config: dict) -> bool:
    """True when the optimizer state lives on the CPU (needs DeepSpeedCPUAdam)."""
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def json_file_problems(dist: DistConfig) -> list[str]:
    """A dist.deepspeed JSON that is missing (what a readable one's ZeRO stage rules out is config/validate.py's)."""
    ds = dist.deepspeed
    return [f"dist.deepspeed: file {ds!r} not found"] if ds.endswith(".json") and not Path(ds).is_file() else []
