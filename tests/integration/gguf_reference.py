"""llama.cpp's own converter as the reference for GGUF export, and a comparison of two GGUF files.

The converter is the copy vendored in the llama-cpp-python 0.3.36 sdist (`vendor/llama.cpp/`), fetched
once with pip and cached (QWEN_FT_TEST_CACHE, default ~/.cache/qwen-ft-tests); tests skip, saying so,
where it cannot be fetched. It runs in its own process with its own gguf-py, as users run it.
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SDIST = "llama-cpp-python==0.3.36"
KEEP = (
    "vendor/llama.cpp/convert_hf_to_gguf.py",
    "vendor/llama.cpp/convert_lora_to_gguf.py",
    "vendor/llama.cpp/conversion/",
    "vendor/llama.cpp/gguf-py/",
)


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN_FT_TEST_CACHE", Path.home() / ".cache" / "qwen-ft-tests"))


def converter() -> Path:
    """Path of convert_hf_to_gguf.py, fetched and unpacked on first use; skips the test where it cannot be."""
    root = cache_dir() / "llama-cpp-python-0.3.36"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file() and script.with_name("convert_lora_to_gguf.py").is_file():
        return script
    root.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(root), SDIST],
        capture_output=True,
        text=True,
    )
    archives = list(root.glob("llama_cpp_python-*.tar.gz"))
    if got.returncode != 0 or not archives:
        pytest.skip(f"cannot fetch the {SDIST} sdist for llama.cpp's converter: {got.stderr.strip()[-300:]}")
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/", 1)[-1].startswith(KEEP)]
        for m in members:
            m.name = m.name.split("/", 1)[1]
        tar.extractall(root, members=members, filter="data")
    archives[0].unlink()
    return script


def convert(model_dir: Path, out: Path, dtype: str) -> Path:
    """Run llama.cpp's converter on `model_dir`. It converts an MTP block where there is one, and a
    Gated DeltaNet checkpoint without one needs its --no-mtp (which other architectures refuse)."""
    hybrid = "linear_conv_kernel_dim" in (model_dir / "config.json").read_text()
    cmd = [sys.executable, str(converter()), str(model_dir), "--outfile", str(out), "--outtype", dtype]
    cmd += ["--no-mtp"] if hybrid and not _index_has_mtp(model_dir) else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def convert_lora(adapter: Path, base: Path, out: Path, dtype: str = "f16") -> Path:
    """Run llama.cpp's convert_lora_to_gguf.py on `adapter` over `base`."""
    script = converter().with_name("convert_lora_to_gguf.py")
    cmd = [sys.executable, str(script), str(adapter), "--base", str(base), "--outfile", str(out), "--outtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _index_has_mtp(model_dir: Path) -> bool:
    index = model_dir / "model.safetensors.index.json"
    return index.is_file() and '"mtp.' in index.read_text()


SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types
STRING, ARRAY = 8, 9


def read(path: Path) -> tuple[dict, dict]:
    """({key: the bytes encoding its type and value}, {tensor name: (type, shape, bytes)}) of a GGUF file,
    walked directly: gguf's GGUFReader decodes every one of 152k tokens in Python and takes seconds."""
    import gguf

    data = path.read_bytes()
    _, _, n_tensors, n_kv = struct.unpack_from("<IIQQ", data, 0)
    off, keys = 24, {}
    for _ in range(n_kv):
        key, off = _string(data, off)
        start = off
        off = _skip_value(data, off + 4, struct.unpack_from("<I", data, off)[0])
        keys[key] = data[start:off]
    infos = []
    for _ in range(n_tensors):
        name, off = _string(data, off)
        (n_dims,) = struct.unpack_from("<I", data, off)
        shape = list(struct.unpack_from(f"<{n_dims}Q", data, off + 4))
        qtype, offset = struct.unpack_from("<IQ", data, off + 4 + 8 * n_dims)
        off += 4 + 8 * n_dims + 12
        infos.append((name, shape, qtype, offset))
    base = -(-off // 32) * 32  # tensor data starts at the next 32-byte boundary (the default alignment)
    tensors = {}
    for name, shape, qtype, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        nbytes = math.prod(shape) // block * size
        tensors[name] = (gguf.GGMLQuantizationType(qtype).name, shape, data[base + offset : base + offset + nbytes])
    return keys, tensors


def _string(data: bytes, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", data, off)
    return data[off + 8 : off + 8 + n].decode(), off + 8 + n


def _skip_value(data: bytes, off: int, vtype: int) -> int:
    if vtype == STRING:
        return off + 8 + struct.unpack_from("<Q", data, off)[0]
    if vtype != ARRAY:
        return off + SCALAR_BYTES[vtype]
    item, n = struct.unpack_from("<IQ", data, off)
    off += 12
    if item in SCALAR_BYTES:
        return off + n * SCALAR_BYTES[item]
    for _ in range(n):
        off = _skip_value(data, off, item)
    return off


def value(path: Path, key: str):
    """One key's decoded value (strings and scalars: what the tests ask for)."""
    raw = read(path)[0][key]
    (vtype,) = struct.unpack_from("<I", raw, 0)
    if vtype == STRING:
        return raw[12:].decode()
    formats = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    return struct.unpack_from("<" + formats[vtype], raw, 4)[0]


def differences(ours: Path, reference: Path, extra_tensors: tuple[str, ...] = ()) -> list[str]:
    """Every key or tensor that differs (by name, type, shape and bytes), as readable lines."""
    k1, t1 = read(ours)
    k2, t2 = read(reference)
    out = [
        f"key {k}: {_shown(ours, k)} != {_shown(reference, k)}"
        for k in k1.keys() | k2.keys()
        if k1.get(k) != k2.get(k)
    ]
    out += [f"tensor {n} only in ours" for n in t1.keys() - t2.keys() if n not in extra_tensors]
    out += [f"tensor {n} only in the reference" for n in t2.keys() - t1.keys()]
    out += [f"tensor {n}: {t1[n][:2]} != {t2[n][:2]} or bytes differ" for n in t1.keys() & t2.keys() if t1[n] != t2[n]]
    return sorted(out)


def _shown(path: Path, key: str) -> str:
    try:
        return repr(value(path, key))[:100]
    except KeyError:
        return "(absent)"
    except (struct.error, UnicodeDecodeError):
        return "(an array)"
