"""Full-model outputs in the base checkpoint's own layout: untrained tensors copied byte for byte.

A composite checkpoint (Qwen3.5/3.6: language model, vision tower, multi-token-prediction layers)
is trained text-only. Its outputs (a full fine-tune, a merged adapter) must still be the whole
checkpoint, loadable by stock transformers and vLLM as the original: the vision tower exactly as
it was (not round-tripped through fp32 training weights) and the `mtp.*` tensors, which
transformers does not even load. So the model saves only what it trains, and the base's other
tensors are copied from its own files, one base shard at a time, under an index listing them all.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from qwen_ft.model.families import under

INDEX = "model.safetensors.index.json"
# what a server reads beside the weights to feed the vision tower (copied unchanged into full outputs)
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class BaseLayout:
    """The base checkpoint whose untrained tensors (these prefixes) every full-model output copies."""

    path: Path
    prefixes: tuple[str, ...]

    @classmethod
    def of(cls, path: str | Path, family) -> BaseLayout | None:
        """For a family with frozen or unloaded tensors; None for the others (nothing to copy)."""
        prefixes = (*family.frozen, *family.unloaded)
        return cls(Path(path), prefixes) if prefixes else None


def tensor_files(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index, or the files themselves)."""
    from safetensors import safe_open

    d = Path(directory)
    if (d / INDEX).is_file():
        weight_map = json.loads((d / INDEX).read_text())["weight_map"]
        return {name: d / file for name, file in weight_map.items()}
    found = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "np") as fh:
            found.update({name: f for name in fh.keys()})
    return found


def trained_state(state_dict: dict, prefixes: tuple[str, ...]) -> dict:
    """The tensors an output writes itself: all but those copied from the base."""
    return {k: v for k, v in state_dict.items() if not under(k, prefixes)}


def add_base_tensors(base: str | Path, out: str | Path, prefixes: tuple[str, ...]) -> int:
    """Copy the base's tensors under `prefixes` into `out` (written without them) and index every
    shard, and the base's processor files; returns how many tensors were copied. Each copy keeps the
    base's dtype and bytes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = Path(out)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, f in tensor_files(base).items():
        if under(name, prefixes):  # `Family.frozen` + `Family.unloaded`: taken from the base unchanged
            by_file[f].append(name)
    for name in PROCESSOR_FILES:
        if (Path(base) / name).is_file():
            shutil.copyfile(Path(base) / name, out / name)
    if not by_file:
        return 0
    own = _own_shards(out)
    shards = [*own, *(out / f"base-{i:05d}.safetensors" for i in range(len(by_file)))]
    for (src, names), dst in zip(sorted(by_file.items()), shards[len(own) :], strict=True):
        with safe_open(str(src), "pt") as fh:
            save_file({n: fh.get_tensor(n) for n in sorted(names)}, str(dst), metadata={"format": "pt"})
    write_index(out, shards)
    return sum(len(v) for v in by_file.values())


def drop_tensors(out: str | Path, prefixes: tuple[str, ...]) -> int:
    """Remove the tensors under `prefixes` from the safetensors shards in `out` (each shard holding some
    rewritten, one at a time), so that `add_base_tensors` can put the base's own in; returns how many."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, f in tensor_files(out).items():
        by_file[f].append(name)
    dropped = 0
    for f, names in sorted(by_file.items()):
        kept = [n for n in names if not under(n, prefixes)]
        if len(kept) == len(names):
            continue
        with safe_open(str(f), "pt") as fh:
            state, metadata = {n: fh.get_tensor(n) for n in kept}, fh.metadata()
        tmp = f.with_suffix(".tmp")
        save_file(state, str(tmp), metadata=metadata)
        tmp.replace(f)
        dropped += len(names) - len(kept)
    return dropped


def _own_shards(out: Path) -> list[Path]:
    if (out / INDEX).is_file():
        files = json.loads((out / INDEX).read_text())["weight_map"].values()
        return sorted({out / f for f in files})
    return [out / "model.safetensors"]


def write_index(out: Path, shards: list[Path]) -> None:
    """Rename the shards to transformers' model-0000i-of-0000N names and write the index of all."""
    n, weight_map, total = len(shards), {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        shard.rename(out / name)
        for key, entry in _header(out / name).items():
            weight_map[key] = name
            total += entry["data_offsets"][1] - entry["data_offsets"][0]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _header(path: Path) -> dict:
    """A safetensors file's tensor entries (dtype, shape, data_offsets), read from its JSON header."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header
