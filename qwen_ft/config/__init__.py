"""Config: YAML + `key.sub=value` overrides -> frozen, validated RunConfig."""

from qwen_ft.config.load import load_config, parse_overrides
from qwen_ft.config.schema import RunConfig
from qwen_ft.config.validate import validate_config

__all__ = ["RunConfig", "load_config", "parse_overrides", "validate_config"]
