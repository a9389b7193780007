"""Writing directories so that a reader sees the old one or the complete new one, never a part."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def flush_tree(root: Path) -> None:
    """fsync every file under `root`, so a rename after it cannot expose unwritten data after a crash."""
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())


def commit_dir(tmp: Path, final: Path) -> None:
    """Flush every file of `tmp`, then rename it to `final` in one step (an old `final` is replaced)."""
    flush_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextmanager
def atomic_dir(final: str | Path, complete: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `final` to write into; on success it becomes `final` in one
    rename, on failure it is removed. `complete(final)` true at commit time means another process
    finished the same directory first: its copy is kept and this one dropped."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if not (complete and complete(final)):
            commit_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_temps(parent: str | Path) -> list[Path]:
    """Remove `atomic_dir` temporaries under `parent` whose process is gone (a run killed mid-write)."""
    removed = []
    for tmp in Path(parent).glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def process_alive(pid: int) -> bool:
    """True while process `pid` (on this host) exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_json_object(path: str | Path) -> dict:
    """The object in a JSON file, or {} when it is missing or unreadable (the caller reports those)."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def copy_into(files: Iterable[str | Path], out: str | Path, root: str | Path | None = None) -> Path:
    """Copy `files` into directory `out` (created), keeping their names, or with `root` their paths
    below it (a tokenizer's additional_chat_templates/); returns `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = out / (Path(f).relative_to(root) if root is not None else Path(f).name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    return out


def writable(path: Path) -> bool:
    """The directory exists and is writable, or its nearest existing ancestor is (it can be created)."""
    for d in (path, *path.absolute().parents):
        if d.exists():
            return d.is_dir() and os.access(d, os.W_OK | os.X_OK)
    return False
