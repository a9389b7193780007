"""An output directory belongs to one run: a lock names the process writing it, a new run never
writes over another run's outputs unless told to clear them, and resuming continues only a run
with the same trajectory.

Resume rule: the config saved in the checkpoint (`run_config.yaml`) is compared with the new one.
Keys in SAFE_TO_CHANGE may differ: more steps or epochs, logging, eval and save cadence, where the
cache lives, and how the same math is computed (attention kernel, recomputation, compilation,
loss chunking). Any other difference (model, data, method, LoRA shape or scale, quantization,
batch plan, seed, optimizer and schedule) is refused with the list of changed keys.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from qwen_ft.errors import QwenFtError
from qwen_ft.files import process_alive, read_json_object

LOCK = ".qwen-ft.lock"
SAFE_TO_CHANGE = {
    "train.max_steps",
    "train.epochs",
    "train.logging_steps",
    "train.eval_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.resume",
    "train.resume_data",
    "train.overwrite_output_dir",
    "train.collective_timeout",
    "data.cache_dir",
    "data.num_proc",
    "model.attn_implementation",
    "model.gradient_checkpointing",
    "model.checkpoint_fraction",
    "model.compile",
    "train.loss_chunk_tokens",
    "train.loss_kernel",
    "train.output_dir",
}
OUTPUT_FILES = (
    "run_config.yaml",
    "manifest.json",
    "adapter_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "train_history.json",
)


class OutputLock:
    """`output_dir/.qwen-ft.lock` holding this process's id; refused while another live process holds it."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK
        self.held = False

    def acquire(self) -> OutputLock:
        """Take the lock (a stale one, whose process is gone, is taken over).

        Raises:
            QwenFtError: another live process holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_json_object(self.path)
                if _alive(holder):
                    raise QwenFtError(
                        f"train.output_dir {self.path.parent} is in use by another run (pid "
                        f"{holder.get('pid')} on {holder.get('host')}); wait for it to finish, or "
                        "choose another output_dir"
                    ) from None
                self.path.unlink(missing_ok=True)  # its process is gone: a stale lock
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise QwenFtError(f"could not take the lock {self.path}; remove it if no run is using the directory")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(holder: dict) -> bool:
    """True when the lock's process still runs (on another host it is assumed to)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    return holder.get("host") != socket.gethostname() or process_alive(pid)


def previous_outputs(output_dir: str | Path) -> list[str]:
    """What an earlier run left in `output_dir` (its final files, its checkpoints)."""
    d = Path(output_dir)
    found = [f for f in OUTPUT_FILES if (d / f).exists()]
    ckpts = d / "checkpoints"
    if ckpts.is_dir() and any(p.name.startswith("checkpoint-") for p in ckpts.iterdir()):
        found.append("checkpoints/")
    return found


def claim_fresh(output_dir: str | Path, overwrite: bool) -> None:
    """A new run (nothing to resume) into `output_dir`: refused when it holds another run's outputs,
    unless `overwrite`, which clears them first (the lock stays).

    Raises:
        QwenFtError: naming what is there and the fix.
    """
    found = previous_outputs(output_dir)
    if not found:
        return
    if not overwrite:
        raise QwenFtError(
            f"train.output_dir {output_dir} holds another run's outputs ({', '.join(found)}); choose a "
            "new output_dir, resume it (train.resume: auto, with its config), or set "
            "train.overwrite_output_dir: true to clear it first"
        )
    for entry in Path(output_dir).iterdir():
        if entry.name != LOCK:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


# the data a run reads: another is allowed on resume with train.resume_data: restart
DATA_FILES = {"data.train_files", "data.eval_files"}


def config_diff(saved: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """`key: saved -> now` for every leaf that differs and is not safe to change on resume (nor, with
    train.resume_data: restart, one of the data files).

    `defaults` (the schema's, as a config dict): a key that a checkpoint written by an older
    qwen-ft lacks counts as its default then, since it did not exist and that is what ran.
    """
    out = []
    old, new, base = _leaves(saved), _leaves(now), _leaves(defaults or {})
    safe = SAFE_TO_CHANGE | (DATA_FILES if new.get("train.resume_data") == "restart" else set())
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, base.get(key, "(absent)")), new.get(key, "(absent)")
        if a != b and key not in safe:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and k != "template_kwargs":
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_run(ckpt: Path, now: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Resume continues only the run that wrote `ckpt`.

    Raises:
        QwenFtError: with the changed keys.
    """
    import yaml

    saved_file = ckpt / "run_config.yaml"
    saved = yaml.safe_load(saved_file.read_text()) if saved_file.is_file() else None
    if not isinstance(saved, dict):
        raise QwenFtError(
            f"{ckpt} has no readable run_config.yaml, so it cannot be matched to this run; start "
            "fresh with train.resume: none (and train.overwrite_output_dir: true)"
        )
    changed = config_diff(saved, now, defaults)
    if changed:
        raise QwenFtError(
            f"{ckpt} belongs to a run with other settings; resuming would mix them:\n  "
            + "\n  ".join(changed)
            + "\nRestore these settings to resume, or start a new run in "
            "another output_dir (or with train.overwrite_output_dir: true)"
        )


def output_dir_problems(output_dir: str) -> list[str]:
    """train.output_dir must be a directory this user can write (or create)."""
    from qwen_ft.files import writable

    if writable(Path(output_dir)):
        return []
    return [f"train.output_dir: {output_dir!r} cannot be written by this user; choose a directory you can write"]
