"""Print what this machine offers qwen-ft on a GPU: versions, device, and which fast attention kernels exist.

Run: python scripts/gpu_probe.py [OUT.json]   (part of scripts/gpu_check.sh)
"""

from __future__ import annotations

import importlib
import json
import platform
import sys


def _version(mod: str) -> str | None:
    try:
        return getattr(importlib.import_module(mod), "__version__", "present")
    except Exception as e:  # a broken wheel is information here, not a crash
        return f"import failed: {type(e).__name__}: {str(e)[:200]}"


def attention_kernels() -> dict:
    import torch

    out = {}
    try:
        from torch.nn.attention import varlen  # noqa: F401

        out["torch.nn.attention.varlen"] = "present"
    except Exception as e:
        out["torch.nn.attention.varlen"] = f"absent: {e}"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        out["flex_attention"] = "present"
    except Exception as e:
        out["flex_attention"] = f"absent: {e}"
    if torch.cuda.is_available():
        out["sdpa_flash"] = bool(torch.backends.cuda.flash_sdp_enabled())
        out["cudnn_sdpa"] = bool(torch.backends.cuda.cudnn_sdp_enabled())
    return out


def main() -> None:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "attention": attention_kernels(),
    }
    for mod in (
        "transformers",
        "peft",
        "accelerate",
        "datasets",
        "bitsandbytes",
        "gptqmodel",
        "deepspeed",
        "flash_attn",
        "liger_kernel",
        "triton",
    ):
        info[mod] = _version(mod)
    text = json.dumps(info, indent=1)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
