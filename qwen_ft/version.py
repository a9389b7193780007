"""The package version (a leaf module: checkpoints and the CLI read it without importing the API)."""

__version__ = "0.1.0"
