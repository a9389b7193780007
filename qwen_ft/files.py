"""Writing directories so that a reader sees the old one or the complete new one, never a part."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qwen_ft.errors import QwenFtError

# what a write that ran out of room raises, by errno: the filesystem, the per-file limit, a quota
NO_ROOM = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "a file grew past the per-file size limit (ulimit -f)",
    errno.EDQUOT: "the disk quota is exceeded",
}


def no_room(exc: BaseException) -> int | None:
    """The errno when `exc` is a write that ran out of room, as Python raises it (OSError) or as the
    libraries that write through their own code do (safetensors' Rust writer: SafetensorError
    "... (os error 28)"); None for any other error."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in NO_ROOM else None
    found = re.search(r"os error (\d+)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    code = int(found.group(1)) if found else None
    return code if code in NO_ROOM else None


def room_message(path: str | Path, code: int, needed: int | None = None) -> str:
    """`path` could not be written for want of room: why, the space needed (when known) and free, and
    the per-file size limit when one is set."""
    import resource

    free = shutil.disk_usage(_existing(Path(path))).free
    text = f"writing {path} failed: {NO_ROOM[code]}; {size(free)} free on its filesystem"
    text += f", about {size(needed)} needed" if needed else ""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return text + (f", files limited to {size(limit)} (ulimit -f)" if limit != resource.RLIM_INFINITY else "")


def size(n: float) -> str:
    """Bytes for people: 8.0 KiB, 1.5 MiB, 14.1 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def _existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor (disk_usage needs one)."""
    return next(d for d in (path, *path.absolute().parents) if d.exists())


@contextmanager
def room_for(path: str | Path, fix: str, needed: int | None = None) -> Iterator[None]:
    """Turn a write into `path` that runs out of room into one QwenFtError naming the path, the space
    needed and free, and `fix`; other errors pass unchanged. Whoever writes cleans up its own temporary
    files (`atomic_dir` does)."""
    try:
        yield
    except Exception as e:
        code = no_room(e)
        if code is None:
            raise
        raise QwenFtError(f"{room_message(path, code, needed)}. {fix}") from None


def tree_bytes(root: str | Path) -> int:
    """Bytes of the files under `root` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


def flush_tree(root: Path) -> None:
    """fsync every file under `root`, so a rename after it cannot expose unwritten data after a crash."""
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())


def commit_dir(tmp: Path, final: Path) -> None:
    """Flush every file of `tmp`, then rename it to `final`. An old `final` is renamed aside first and removed
    after, so a kill at any moment leaves the old complete directory or the new one at `final`, never a
    partly deleted one (what is left aside is a stale temporary, removed by the next run)."""
    flush_tree(tmp)
    old = final.with_name(f".{final.name}.tmp-old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(
    final: str | Path, complete: Callable[[Path], bool] | None = None, needed: int | None = None
) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `final` to write into; on success it becomes `final` in one
    rename, on failure it is removed. `complete(final)` true at commit time means another process
    finished the same directory first: its copy is kept and this one dropped. Running out of room is one
    QwenFtError naming `final` and the space (`needed` bytes, when the writer knows)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    clean_stale_temps(final.parent, glob.escape(final.name))  # what a killed earlier attempt left
    try:
        with room_for(final, "Free space (or write it elsewhere) and run the command again", needed):
            tmp.mkdir(parents=True)
            yield tmp
            if not (complete and complete(final)):
                commit_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_temps(parent: str | Path, name: str = "*") -> list[Path]:
    """Remove `atomic_dir` temporaries (of directories, or files written the same way, matching the glob
    `name`) under `parent` whose process is gone (one killed mid-write)."""
    removed = []
    for tmp in Path(parent).glob(f".{name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
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


# Files up to this size are hashed whole; larger ones (a full model's weights) by their size and their
# first, middle and last MiB unless `whole` is asked: that finds truncation and most damage without
# reading gigabytes on every checkpoint save.
FULL_HASH_BYTES = 256 << 20
SAMPLE = 1 << 20


def file_digest(path: Path, whole: bool = False) -> str:
    """blake2b of the whole file, or of its size and three sampled MiB when it is large (and not `whole`)."""
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if whole or size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            for offset in (0, size // 2, size - SAMPLE):
                fh.seek(offset)
                h.update(fh.read(SAMPLE))
    return h.hexdigest()


def write_digests(root: Path, manifest: str, whole: bool = False) -> None:
    """Record every file under `root` (relative path -> size and digest) in root/`manifest`."""
    files = {
        str(f.relative_to(root)): {"size": f.stat().st_size, "digest": file_digest(f, whole)}
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name != manifest
    }
    (root / manifest).write_text(json.dumps(files, indent=1))


def digest_problems(root: Path, manifest: str, whole: bool = False) -> list[str]:
    """What is wrong with the files under `root` against root/`manifest` (empty: they verify)."""
    try:
        files = json.loads((root / manifest).read_text())
    except (OSError, ValueError):
        return [f"no readable {manifest} (written by older versions, or the write did not finish)"]
    out = []
    for name, rec in files.items():
        f = root / name
        if not f.is_file():
            out.append(f"{name} is missing")
        elif f.stat().st_size != rec["size"]:
            out.append(f"{name} is {f.stat().st_size} bytes, {rec['size']} recorded (truncated?)")
        elif file_digest(f, whole) != rec["digest"]:
            out.append(f"{name} does not match its recorded hash")
    return out
