"""qwen-ft: fine-tuning toolkit for Qwen models. Importing it loads nothing heavy.

Library API (see `qwen_ft.api`): finetune, load_config, merge, estimate, chat.
"""

from __future__ import annotations

from typing import Any

from qwen_ft.version import __version__

__all__ = ["finetune", "load_config", "merge", "estimate", "chat", "__version__"]


def __getattr__(name: str) -> Any:
    """The API functions, imported on first use so `import qwen_ft` stays light."""
    if name in __all__:
        from qwen_ft import api

        return getattr(api, name)
    raise AttributeError(f"module 'qwen_ft' has no attribute {name!r}")
