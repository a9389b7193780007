"""qwen-ft: fine-tuning toolkit for Qwen models. Importing it loads nothing heavy."""

__version__ = "0.1.0"
