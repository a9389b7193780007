"""Choosing where a run starts: fresh, the newest complete checkpoint, or a given one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qwen_ft.errors import QwenFtError
from qwen_ft.train import checkpoint as ck


def resume_path(resume: str, output_dir: str, say: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from, or None to start fresh. `auto` takes the newest checkpoint that
    verifies (`verify.py`) and says which damaged ones it skipped.

    Raises:
        QwenFtError: train.resume names a directory that is not a complete, intact checkpoint.
    """
    from qwen_ft.train import verify

    if resume == "none":
        return None
    if resume == "auto":
        for ckpt in reversed(ck.list_checkpoints(Path(output_dir) / "checkpoints")):
            damaged = verify.problems(ckpt)
            if not damaged:
                return ckpt
            say(f"resume: skipped {ckpt}: {'; '.join(damaged)}")
        return None
    path = Path(resume)
    if not (path / ck.STATE_FILE).is_file():
        raise QwenFtError(
            f"train.resume: {resume!r} is not a complete checkpoint (no {ck.STATE_FILE}); "
            "use auto, none, or a checkpoint-N directory"
        )
    damaged = verify.problems(path)
    if damaged:
        raise QwenFtError(
            f"train.resume: {resume} is damaged ({'; '.join(damaged)}); resume from an older "
            "checkpoint, or use train.resume: auto to take the newest that verifies"
        )
    return path


def data_changes(state: ck.TrainState, data_key: str, inputs: dict) -> list[str]:
    """What changed in the data since the checkpoint of `state` (empty: the same tokenized rows, so
    its data position points at the same examples)."""
    from qwen_ft.data.tokenize import input_changes

    if not state.data_key or state.data_key == data_key:
        return []
    found = input_changes(state.data_inputs, inputs) if state.data_inputs else []
    return found or [f"the tokenized data (cache key {state.data_key}, now {data_key})"]


def check_same_data(changes: list[str], ckpt: Path) -> None:
    """Refuse to continue on different data: the saved position would point into other examples.

    Raises:
        QwenFtError: naming what changed.
    """
    if changes:
        raise QwenFtError(
            f"{ckpt} was trained on other data; since then:\n  " + "\n  ".join(changes) + "\nResume with the "
            "same data, or set train.resume_data: restart to start the new data from its beginning (weights, "
            "optimizer and step kept), or start fresh with train.resume: none"
        )
