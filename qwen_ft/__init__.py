"""qwen-ft: fine-tuning toolkit for Qwen models. Importing it loads nothing heavy.

Library API (see `qwen_ft.api`): finetune, load_config, merge, estimate, chat.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["finetune", "load_config", "merge", "estimate", "chat", "__version__"]


def __getattr__(name: str) -> Any:
    """The API functions, imported on first use so `import qwen_ft` stays light."""
    if name in __all__:
        from qwen_ft import api

        return getattr(api, name)
    raise AttributeError(f"module 'qwen_ft' has no attribute {name!r}")
