"""Checkpoints written whole or not at all: every rank writes its part into a temporary directory, the
main process renames it into place; a save that fails (a full disk) stops the run with the last good
checkpoint intact."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qwen_ft.errors import QwenFtError
from qwen_ft.files import commit_dir, no_room, room_message, tree_bytes
from qwen_ft.train import checkpoint as ck
from qwen_ft.train.distributed import barrier
from qwen_ft.train.protocols import SavedRun
from qwen_ft.train.verify import write_manifest


def save_checkpoint(tr: SavedRun, state: ck.TrainState, root: Path, keep: int) -> Path:
    """Atomic checkpoint under root/checkpoint-{step}: every rank writes its part into a temporary
    directory, then the main process renames it into place."""
    final, tmp = root / f"checkpoint-{state.step}", root / f".tmp-checkpoint-{state.step}"
    with failed_saves_stop(final, root, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        if tr.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(tr.dist)
        tr.save_fn(tmp)
        tr.backend.save_state(tmp, state, tr.dist.is_main)
        barrier(tr.dist)
        if tr.dist.is_main:
            write_manifest(tmp)  # sizes and hashes, last: a checkpoint without it never verifies
            commit_dir(tmp, final)
            ck.prune(root, keep)
    barrier(tr.dist)
    return final


def remove_stale_saves(output_dir: str | Path) -> list[Path]:
    """Remove what saves cut short by a kill or a second signal left (`.tmp-checkpoint-N`, `.final.tmp-PID`):
    the run holds the output directory's lock, so no other process is writing them."""
    out = Path(output_dir)
    stale = [*(out / "checkpoints").glob(".tmp-checkpoint-*"), *out.glob(".final.tmp-*")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextmanager
def failed_saves_stop(path: Path, checkpoints: Path, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """A save into `path` that fails for want of room (OSError, or SafetensorError from safetensors'
    writer) or for another OSError (a lost mount) stops the run with one error naming the newest checkpoint
    under `checkpoints`, after `cleanup`; other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        if not isinstance(e, OSError) and no_room(e) is None:
            raise
        if cleanup is not None:
            cleanup()
        raise QwenFtError(save_failed_message(path, e, ck.list_checkpoints(checkpoints))) from None


def save_failed_message(path: Path, error: Exception, saved: list[Path]) -> str:
    """What a failed save says: the path and why (for want of room: the space needed, as much as the
    last checkpoint took, and free), the last good checkpoint and how to go on."""
    code = no_room(error)
    needed = tree_bytes(saved[-1]) if saved else None
    why = room_message(path, code, needed) if code is not None else f"saving {path} failed: {error}"
    last = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved before"
    return f"{why}; {last}. Free space (or fix the directory), then resume with train.resume: auto"
