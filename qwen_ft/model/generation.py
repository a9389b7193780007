"""generation_config.json of an output: the base's own, with the end-of-turn ids set, so a server
stops where training ended each reply and keeps every other default of the base (sampling, length)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def serving_generation_config(base_dir: str | Path, tok) -> dict[str, Any]:
    """The base's generation config (empty when it has none) whose eos ids include <|im_end|> and
    <|endoftext|>; the base's own ids stay first."""
    path = Path(base_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        config = {}  # an unreadable base file is not copied; the ids below are what serving needs
    eos = config.get("eos_token_id")
    ids = list(eos) if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    config["eos_token_id"] = ids + [t for t in (tok.im_end_id, tok.endoftext_id) if t not in ids]
    config.setdefault("pad_token_id", tok.endoftext_id)
    return config


def write_generation_config(base_dir: str | Path, tok, out: str | Path) -> None:
    """Write `serving_generation_config` into directory `out`."""
    text = json.dumps(serving_generation_config(base_dir, tok), indent=2)
    (Path(out) / "generation_config.json").write_text(text + "\n")
