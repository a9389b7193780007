"""Choosing where a run starts: fresh, the newest complete checkpoint, or a given one."""

from __future__ import annotations

from pathlib import Path

from qwen_ft.errors import QwenFtError
from qwen_ft.train import checkpoint as ck


def resume_path(resume: str, output_dir: str) -> Path | None:
    """The checkpoint to resume from, or None to start fresh.

    Raises:
        QwenFtError: train.resume names a directory that is not a complete checkpoint.
    """
    if resume == "none":
        return None
    if resume == "auto":
        found = ck.list_checkpoints(Path(output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / ck.STATE_FILE).is_file():
        raise QwenFtError(f"train.resume: {resume!r} is not a complete checkpoint (no {ck.STATE_FILE}); "
                          "use auto, none, or a checkpoint-N directory")
    return path


def check_same_data(state: ck.TrainState, data_key: str, ckpt: Path) -> None:
    """Refuse to resume on different data: the saved position would point into other examples.

    Raises:
        QwenFtError: the tokenized data differs from the checkpoint's.
    """
    if state.data_key and state.data_key != data_key:
        raise QwenFtError(f"{ckpt} was trained on different data or data settings (cache key {state.data_key}, now "
                          f"{data_key}); resume with the same data, or start fresh with train.resume=none")
