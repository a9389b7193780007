"""Third-party noise off unless asked for: a user of qwen-ft sees qwen-ft's own lines and its
progress bar. Called once by each entry point, before anything heavy is imported."""

from __future__ import annotations

import logging
import os
import warnings

# Import-time banners of optional stacks, switched off through their own environment variables.
QUIET_ENV = {
    "GPTQMODEL_LOGLEVEL": "ERROR",  # gptqmodel's banner (logbar)
    "DS_ACCELERATOR": None,  # left to DeepSpeed; listed so --verbose keeps the user's choice
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

QUIET_LOGGERS = (
    "torch.utils._pytree",
    "torchao",
    "bitsandbytes",
    "DeepSpeed",
    "deepspeed",
    "gptqmodel",
    "logbar",
    "accelerate",
    "datasets",
    "peft",
    "kernels",
    "huggingface_hub",
)


def quiet_third_party(verbose: bool = False) -> None:
    """Hide third-party warnings, banners and progress bars (not errors); `verbose` leaves them on.
    Either way the hub libraries are told to stay offline: qwen-ft reads local directories only,
    and a mistyped path must fail at once rather than retry a download."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        if value is not None:
            os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|torch|accelerate)\b")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|torch|torchao)\b")
    _quiet_transformers()


def _quiet_transformers() -> None:
    """transformers' own logger and its "Loading weights" bars; datasets' map bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from datasets.utils import logging as ds_logging

        ds_logging.set_verbosity_error()
        ds_logging.disable_progress_bar()
    except ImportError:
        pass
