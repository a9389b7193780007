"""Problems between a config and this machine, found before any work: each layer checks its own subject
(the checkpoint and tokenizer directories in model/, the data files and cache in data/, the output
directory and DeepSpeed JSON in train/), and the optional packages the config turns on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwen_ft import deps

if TYPE_CHECKING:
    from qwen_ft.config.schema import RunConfig


def run_problems(cfg: RunConfig) -> list[str]:
    """Everything that stops `cfg` from running here: the environment, and the method against the checkpoint."""
    return check_environment(cfg) + method_problems(cfg) + serving_problems(cfg)


def serving_problems(cfg: RunConfig) -> list[str]:
    """train.serve_for: a server named there that would not serve this run's output as trained."""
    from pathlib import Path

    from qwen_ft.export.servers import gguf_status, why_not

    if not cfg.train.serve_for:
        return []
    lo = cfg.lora
    adapter = {
        "r": lo.r,
        "lora_alpha": lo.alpha,
        "use_rslora": lo.rslora,
        "use_dora": lo.dora,
        "modules_to_save": ["embeddings", "output layer"] if lo.train_embeddings else None,
    }
    config = adapter if cfg.method != "full" else {}
    gguf = gguf_status(Path(cfg.model.path))
    return [
        f"train.serve_for: {name} would not serve this run's output as trained: {'; '.join(why)}; change the "
        f"setup, or leave {name} out of serve_for and serve the merged model (qwen-ft merge) there"
        for name in cfg.train.serve_for
        if (why := why_not(config, name, gguf))
    ]


def method_problems(cfg: RunConfig) -> list[str]:
    """The method and its settings against the checkpoint at model.path (model/checks.py)."""
    from qwen_ft.model.checks import checkpoint_problems
    from qwen_ft.train.ds_config import is_zero3

    return checkpoint_problems(cfg.model, cfg.method_spec, cfg.dist.deepspeed if is_zero3(cfg.dist) else None)


def check_environment(cfg: RunConfig, need_model: bool = True) -> list[str]:
    """Every such problem of `cfg` at once (`need_model=False`: commands that load no model)."""
    from qwen_ft.config.validate import zero3_conflicts
    from qwen_ft.data.sources import file_problems as data_problems
    from qwen_ft.model.checks import location_problems
    from qwen_ft.train import ds_config
    from qwen_ft.train.ownership import output_dir_problems

    problems = location_problems(cfg.model, cfg.tokenizer_path, need_model) + data_problems(cfg.data)
    problems += output_dir_problems(cfg.train.output_dir) + ds_config.json_file_problems(cfg.dist)
    problems += zero3_conflicts(cfg) if ds_config.is_zero3_json(cfg.dist) else []  # the presets': validate_config
    problems += [deps.missing_message(name, why) for name, why in required_extras(cfg) if not deps.is_available(name)]
    return problems + _loss_kernel_problems(cfg.train.loss_kernel)


def required_extras(cfg: RunConfig) -> list[tuple[str, str]]:
    """(extra, why) for each optional package the config turns on."""
    need = []
    if cfg.dist.deepspeed != "none":
        need.append(("deepspeed", f"dist.deepspeed={cfg.dist.deepspeed}"))
    if cfg.method == "qlora":
        extra = "bnb" if cfg.quant.backend == "bnb" else "gptq"
        need.append((extra, f"method=qlora with quant.backend={cfg.quant.backend}"))
    if cfg.train.loss_kernel == "liger":
        need.append(("liger", "train.loss_kernel=liger"))
    if cfg.model.attn_implementation == "flash_attention_2":
        need.append(("flash_attn", "model.attn_implementation=flash_attention_2"))
    return need


def _loss_kernel_problems(kernel: str) -> list[str]:
    import torch

    if kernel != "liger" or torch.cuda.is_available():
        return []
    return [
        "train.loss_kernel: liger, but this machine has no CUDA GPU (Liger's kernel runs on CUDA tensors); set "
        "train.loss_kernel: auto"
    ]
