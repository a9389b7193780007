"""Checkpoints record their files' sizes and hashes (`checkpoint_files.json`, written last, before the
atomic rename) and are verified before a resume: a truncated, missing or altered file is found.

Files up to FULL_HASH_BYTES are hashed whole; larger ones (full-model weights) by size plus their
first, middle and last MiB, which finds truncation and most damage without reading gigabytes on
every save.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "checkpoint_files.json"
FULL_HASH_BYTES = 256 << 20
SAMPLE = 1 << 20


def file_digest(path: Path) -> str:
    """blake2b of the whole file, or of its size and three sampled MiB when it is large."""
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            for offset in (0, size // 2, size - SAMPLE):
                fh.seek(offset)
                h.update(fh.read(SAMPLE))
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Record every file of `ckpt` (relative path -> size and digest)."""
    files = {
        str(f.relative_to(ckpt)): {"size": f.stat().st_size, "digest": file_digest(f)}
        for f in sorted(ckpt.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    (ckpt / MANIFEST).write_text(json.dumps(files, indent=1))


def problems(ckpt: Path) -> list[str]:
    """What is wrong with `ckpt` against its manifest (empty: it verifies)."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return [f"no readable {MANIFEST} (written by older versions, or the save did not finish)"]
    out = []
    for name, rec in files.items():
        f = ckpt / name
        if not f.is_file():
            out.append(f"{name} is missing")
        elif f.stat().st_size != rec["size"]:
            out.append(f"{name} is {f.stat().st_size} bytes, {rec['size']} recorded (truncated?)")
        elif file_digest(f) != rec["digest"]:
            out.append(f"{name} does not match its recorded hash")
    return out
