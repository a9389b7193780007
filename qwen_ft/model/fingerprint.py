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
