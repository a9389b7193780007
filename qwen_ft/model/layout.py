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
from pathlib import Path

INDEX = "model.safetensors.index.json"
# what a server reads beside the weights to feed the vision tower (copied unchanged into full outputs)
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


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


def kept_from_base(name: str, prefixes: tuple[str, ...]) -> bool:
    """A tensor the output takes from the base unchanged (`Family.frozen` + `Family.unloaded`)."""
    return any(name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def trained_state(state_dict: dict, prefixes: tuple[str, ...]) -> dict:
    """The tensors an output writes itself: all but those copied from the base."""
    return {k: v for k, v in state_dict.items() if not kept_from_base(k, prefixes)}


def add_base_tensors(base: str | Path, out: str | Path, prefixes: tuple[str, ...]) -> int:
    """Copy the base's tensors under `prefixes` into `out` (written without them) and index every
    shard, and the base's processor files; returns how many tensors were copied. Each copy keeps the
    base's dtype and bytes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = Path(out)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, f in tensor_files(base).items():
        if kept_from_base(name, prefixes):
            by_file[f].append(name)
    for name in PROCESSOR_FILES:
        if (Path(base) / name).is_file():
            shutil.copyfile(Path(base) / name, out / name)
    if not by_file:
        return 0
    own = _own_shards(out)
    shards = [*own, *(out / f"base-{i:05d}.safetensors" for i in range(len(by_file)))]
    for (src, names), dst in zip(sorted(by_file.items()), shards[len(own):], strict=True):
        with safe_open(str(src), "pt") as fh:
            save_file({n: fh.get_tensor(n) for n in sorted(names)}, str(dst), metadata={"format": "pt"})
    _write_index(out, shards)
    return sum(len(v) for v in by_file.values())


def _own_shards(out: Path) -> list[Path]:
    if (out / INDEX).is_file():
        files = json.loads((out / INDEX).read_text())["weight_map"].values()
        return sorted({out / f for f in files})
    return [out / "model.safetensors"]


def _write_index(out: Path, shards: list[Path]) -> None:
    """Rename the shards to transformers' model-0000i-of-0000N names and write the index of all."""
    from safetensors import safe_open

    n, weight_map, total = len(shards), {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        shard.rename(out / name)
        with safe_open(str(out / name), "pt") as fh:
            for key in fh.keys():
                weight_map[key] = name
                sl = fh.get_slice(key)
                total += _nbytes(sl.get_dtype(), sl.get_shape())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


SIZES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1}


def _nbytes(dtype: str, shape: list[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count * SIZES.get(dtype, 4)
