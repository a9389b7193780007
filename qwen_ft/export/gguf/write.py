"""Write one GGUF file from a full-precision checkpoint directory, streamed tensor by tensor.

The header (every tensor's name, type and shape) is computed first from the safetensors headers with
meta tensors; then each tensor is read, rewritten, encoded and appended, so beyond the output file only
one tensor (one layer's experts, for checkpoints that store experts one by one) is ever in memory. The
file is written beside its final name and renamed when complete: a killed export leaves no half file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_ft.errors import QwenFtError
from qwen_ft.export.gguf import DTYPES
from qwen_ft.export.gguf.metadata import (
    PRE_TOKENIZER,
    expert_count,
    hparams,
    write_general,
    write_hparams,
    write_tokenizer,
)
from qwen_ft.export.gguf.tensors import F32_TENSORS, NEXTN, Layout, block_of, converted

# llama.cpp's fixed top-k renormalisation per MoE architecture (it reads no key for it)
TOPK_NORMALISED = {"qwen2moe": False, "qwen3moe": True, "qwen3next": True, "qwen35moe": True}
# architectures whose llama.cpp loader needs output.weight even when the checkpoint ties it to the embeddings
NEEDS_OUTPUT = ("qwen2moe",)


@dataclass(frozen=True)
class GgufReport:
    """What was written."""

    path: Path
    arch: str
    dtype: str
    tensors: int
    bytes: int


def layout_of(hp: dict, arch: str) -> Layout:
    """The config facts the tensor rewrites need."""
    return Layout(
        arch=arch,
        layers=hp["num_hidden_layers"],
        experts=expert_count(hp),
        hybrid="linear_conv_kernel_dim" in hp,
        tiled_v=arch.startswith("qwen35"),
        k_heads=hp.get("linear_num_key_heads", 0),
        v_heads=hp.get("linear_num_value_heads", 0),
        k_dim=hp.get("linear_key_head_dim", 0),
        v_dim=hp.get("linear_value_head_dim", 0),
        hidden=hp["hidden_size"],
    )


def checkpoint_tensors(src: Path) -> dict[str, Path]:
    """Tensor name → its safetensors file: the index's weight map, else model.safetensors (never other
    safetensors lying beside it, such as a training checkpoint's optimizer state); RoPE's cached inverse
    frequencies, which some checkpoints store, are not weights."""
    from qwen_ft.model.layout import INDEX, tensor_files

    if not (src / INDEX).is_file() and not (src / "model.safetensors").is_file():
        raise QwenFtError(f"{src}: no model.safetensors or {INDEX}; GGUF export reads safetensors checkpoints")
    found = tensor_files(src) if (src / INDEX).is_file() else _keys(src / "model.safetensors")
    return {name: f for name, f in found.items() if not name.endswith(".rotary_emb.inv_freq")}


def _keys(file: Path) -> dict[str, Path]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as st:
        return dict.fromkeys(st.keys(), file)


def name_mapper(arch: str, blocks: int) -> Callable[[str], str]:
    """HF tensor name → GGUF name: gguf's own map, plus the MTP (nextn) names it lacks for Qwen."""
    import gguf

    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    table = gguf.get_tensor_name_map(arch_id, blocks)

    def to_gguf(name: str) -> str:
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            return mapped
        bid, stem = block_of(name), name.rsplit(".", 1)[0]
        inner = stem.split(".", 3)[-1] if bid is not None else ""
        if inner in NEXTN:
            return f"blk.{bid}.{NEXTN[inner]}.{name.rsplit('.', 1)[1]}"
        raise QwenFtError(f"tensor {name!r} has no GGUF name for architecture {arch}; it cannot be exported")

    return to_gguf


def tensor_type(name: str, ndim: int, chosen: str):
    """llama.cpp's rule: 1-D tensors, norms, routers, the conv kernel and anything but weights (and LoRA's
    A and B) stay F32."""
    import gguf

    q = gguf.GGMLQuantizationType
    if ndim <= 1 or name.endswith("_norm.weight") or not name.endswith((".weight", ".lora_a", ".lora_b")):
        return q.F32
    if name.split(".", 2)[-1] in F32_TENSORS:
        return q.F32
    return q[chosen]


def encode(data: torch.Tensor, qtype):
    """The tensor as the bytes (numpy array) of `qtype`; a row length Q8_0 cannot block falls back to F16."""
    import gguf

    array = data.numpy()
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def planned(shape: tuple[int, ...], qtype):
    """(shape as written, bytes, type) of a tensor of `shape` encoded as `qtype`, without its data."""
    import gguf

    q = gguf.GGMLQuantizationType
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        qtype = q.F16
    if qtype in (q.F32, q.F16):
        itemsize = 4 if qtype == q.F32 else 2
        return shape, int(torch.Size(shape).numel()) * itemsize, qtype
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, int(torch.Size(byte_shape).numel()), qtype


class Source:
    """The checkpoint's tensors, readable as meta tensors (shape and dtype only) or as data, one at a time.
    Each read opens its shard and closes it again: a handle kept open keeps every page it has read mapped
    into the process, which would grow with the model instead of staying at one tensor."""

    def __init__(self, src: Path, arch: str):
        self.files = checkpoint_tensors(src)
        self.alias: dict[str, str] = {}  # a tied output layer llama.cpp needs written: the embeddings again
        if arch in NEEDS_OUTPUT and "lm_head.weight" not in self.files:
            self.alias["lm_head.weight"] = next(n for n in self.files if n.endswith("embed_tokens.weight"))
            self.files["lm_head.weight"] = self.files[self.alias["lm_head.weight"]]
        self.names = list(self.files)

    def mtp_layers(self) -> int:
        """Decoder layers of the multi-token-prediction block (mtp.layers.N...)."""
        found = [block_of(n.split("mtp.", 1)[1]) for n in self.names if "mtp.layers." in n]
        return 1 + max((b for b in found if b is not None), default=-1)

    def meta(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as st:
            sl = st.get_slice(self.alias.get(name, name))
            return torch.empty(sl.get_shape(), dtype=_DTYPES[sl.get_dtype()], device="meta")

    def real(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as st:
            return st.get_tensor(self.alias.get(name, name))


def write_gguf(
    src: Path, out: Path, dtype: str, arch: str, im_start_id: int, skip: tuple[str, ...], template, name=None
):
    """Write `out` from the checkpoint in `src` (see module docstring); `name`: general.name (default: from
    the model card or the directory's name, as llama.cpp's converter names it)."""
    import gguf

    hp = hparams(src)
    check_served_alike(hp, arch, src)
    layout, source = layout_of(hp, arch), Source(src, arch)
    blocks = layout.layers + (source.mtp_layers() if layout.hybrid else 0)
    to_gguf, (file_type, chosen) = name_mapper(arch, blocks), DTYPES[dtype]
    plan = [
        (name, *planned(tuple(t.shape), tensor_type(name, t.ndim, chosen)))
        for name, t in converted(source.names, source.meta, layout, skip, to_gguf)
    ]
    own = len(plan) - len(source.alias)  # copies (last in the plan) count no parameters in the size label
    with gguf_file(out, arch) as w:
        _add_infos(w, plan[:own])
        write_general(w, src, name)
        _add_infos(w, plan[own:])
        write_hparams(w, hp, arch, blocks, getattr(gguf.LlamaFileType, file_type))
        write_tokenizer(w, src, hp["vocab_size"], PRE_TOKENIZER[im_start_id], template)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        _stream(w, converted(source.names, source.real, layout, skip, to_gguf), plan, chosen, out.name)
    return GgufReport(out, arch, dtype, len(plan), out.stat().st_size)


@contextmanager
def gguf_file(out: Path, arch: str) -> Iterator:
    """A GGUFWriter on a temporary beside `out`, renamed to `out` once the block completes; on any failure
    the writer is closed and the temporary removed, and running out of room names `out` and the fix."""
    import gguf

    from qwen_ft.files import room_for

    tmp = temporary(out)
    w = gguf.GGUFWriter(tmp, arch)
    try:
        with room_for(out, "Free space (or write the GGUF elsewhere) and run the export again"):
            yield w
            w.close()
        os.replace(tmp, out)
    finally:
        w.close()  # idempotent; on a failure it releases the half-written file before it is removed
        tmp.unlink(missing_ok=True)


def _add_infos(w, entries: list) -> None:
    for tensor, shape, nbytes, qtype in entries:
        w.add_tensor_info(tensor, shape, _np(qtype), nbytes, raw_dtype=qtype)


def temporary(out: Path) -> Path:
    """Where `out` is written until complete; what a killed export left beside it is removed first."""
    import glob

    from qwen_ft.files import clean_stale_temps

    clean_stale_temps(out.parent, glob.escape(out.name))
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def _stream(w, tensors, plan: list, chosen: str, label: str) -> None:
    """Encode and append each tensor in header order, with a progress bar."""
    from tqdm.auto import tqdm

    with tqdm(total=sum(p[2] for p in plan), unit="B", unit_scale=True, desc=f"writing {label}") as bar:
        for (name, t), (planned_name, _, nbytes, qtype) in zip(tensors, plan, strict=True):
            data, got = encode(t, tensor_type(name, t.ndim, chosen))
            assert (name, got, data.nbytes) == (planned_name, qtype, nbytes), name  # as the header says
            w.write_tensor_data(data)
            bar.update(nbytes)


def check_served_alike(hp: dict, arch: str, src: Path) -> None:
    """Refuse a mixture of experts whose routing llama.cpp would compute differently.

    Raises:
        QwenFtError: naming the setting.
    """
    normalised = hp.get("norm_topk_prob")
    if arch in TOPK_NORMALISED and normalised is not None and bool(normalised) != TOPK_NORMALISED[arch]:
        raise QwenFtError(
            f"{src}/config.json: norm_topk_prob {normalised} but llama.cpp's {arch} always "
            f"{'renormalises' if TOPK_NORMALISED[arch] else 'keeps'} the top-k routing weights; its GGUF would "
            "not compute this model. Serve it with vLLM or SGLang instead"
        )


def _np(qtype):
    """The numpy dtype gguf's writer expects beside `qtype`: the float itself, or bytes for block types."""
    import gguf
    import numpy as np

    q = gguf.GGMLQuantizationType
    return np.dtype({q.F32: np.float32, q.F16: np.float16}.get(qtype, np.uint8))


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
