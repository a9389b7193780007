"""Checkpoints record their files' sizes and hashes (`checkpoint_files.json`, written last, before the
atomic rename) and are verified before a resume: a truncated, missing or altered file is found
(`files.write_digests`: large files are hashed by samples, not read whole on every save).
"""

from __future__ import annotations

from pathlib import Path

from qwen_ft.files import digest_problems, write_digests

MANIFEST = "checkpoint_files.json"


def write_manifest(ckpt: Path) -> None:
    """Record every file of `ckpt` (relative path -> size and digest)."""
    write_digests(ckpt, MANIFEST)


def problems(ckpt: Path) -> list[str]:
    """What is wrong with `ckpt` against its manifest (empty: it verifies)."""
    return digest_problems(ckpt, MANIFEST)
