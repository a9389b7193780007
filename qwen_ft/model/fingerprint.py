"""A cheap identity for checkpoint directories (used by manifests and conversion caches)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def model_fingerprint(path: str | Path) -> str:
    """Cheap identity of a checkpoint: config.json plus each weight file's name, size, head and tail."""
    root = Path(path)
    h = hashlib.sha256((root / "config.json").read_bytes())
    for f in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def recorded_base(output_dir: Path, manifest: dict, fix: str) -> Path:
    """The base checkpoint a qwen-ft output's manifest.json records, checked to be the one it was trained on.

    Raises:
        QwenFtError: none recorded, it is gone, or it changed since training; `fix` says what to do.
    """
    from qwen_ft.errors import QwenFtError

    recorded = manifest.get("base_model") or {}
    path = Path(recorded.get("path", ""))
    if not recorded or not (path / "config.json").is_file():
        raise QwenFtError(
            f"{output_dir}: the base model recorded in manifest.json ({recorded.get('path') or 'none'}) "
            f"is not available; {fix}"
        )
    if recorded.get("fingerprint") and model_fingerprint(path) != recorded["fingerprint"]:
        raise QwenFtError(f"{path} changed since {output_dir} was trained (fingerprint differs); {fix}")
    return path
