"""`qwen-ft export DIR --to gguf`: a merged model, a full fine-tune or an adapter (merged first) as one GGUF.

What is refused, before anything is written: an unknown dtype, an output that exists (without
`overwrite`), a quantized checkpoint (GPTQ or bitsandbytes weights are not the trained model at full
precision: merge the adapter into the original base first), and a family llama.cpp cannot run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from qwen_ft.errors import QwenFtError
from qwen_ft.export.gguf import DTYPES
from qwen_ft.export.gguf.write import GgufReport, write_gguf


def export_gguf(src: str | Path, out: str | Path, dtype: str = "f16", overwrite: bool = False) -> GgufReport:
    """Write the model in `src` as the GGUF file `out` (an adapter is merged into its base first).

    Raises:
        QwenFtError: a bad input (see module docstring).
    """
    src, out = Path(src), Path(out)
    check_request(src, out, dtype, overwrite)
    if (src / "adapter_config.json").is_file():
        with beside(out.parent, _merge, src) as merged:
            return _export(merged, out, dtype, name=src.resolve().name)  # named as the adapter, not the temp
    if is_v1(src):
        with beside(out.parent, _native, src) as native:  # named as src: the general.* facts read from its name
            return _export(native, out, dtype)
    return _export(src, out, dtype)


def is_v1(src: Path) -> bool:
    """A Qwen v1 checkpoint (QWenLMHeadModel), which is exported from its native Qwen2 conversion, as trained."""
    from qwen_ft.model.qwen_v1 import is_qwen_v1, read_v1_config

    return (src / "config.json").is_file() and is_qwen_v1(read_v1_config(src))


def served_template(src: Path) -> str | None:
    """The chat template the export of `src` carries: its own, or for a Qwen v1 checkpoint (which has none)
    the ChatML template its native conversion gets, which qwen-ft trains it with."""
    from qwen_ft.data.template import find_template
    from qwen_ft.tokenizer.convert import tokenizer_config

    found = find_template(src)
    if found is not None:
        return found.text
    return tokenizer_config()["chat_template"] if is_v1(src) else None


def check_request(src: Path, out: Path, dtype: str, overwrite: bool) -> None:
    """Refuse what cannot be exported, naming the fix."""
    if dtype not in DTYPES:
        raise QwenFtError(f"--dtype {dtype!r} is not a GGUF export type; choose one of {', '.join(DTYPES)}")
    if not src.is_dir():
        raise QwenFtError(f"{src}: not a directory; point at a merged model, a full fine-tune or an adapter")
    if out.exists() and not overwrite:
        raise QwenFtError(f"--out {out} exists; choose a new path, or pass --overwrite to replace it")
    if out.is_dir():
        raise QwenFtError(f"--out {out} is a directory; name the .gguf file to write")
    if not (src / "adapter_config.json").is_file():
        check_full_precision(src)


def check_full_precision(src: Path) -> None:
    """A GPTQ or bitsandbytes checkpoint cannot be exported as it stands.

    Raises:
        QwenFtError: naming the quantization and the fix.
    """
    import json

    config_file = src / "config.json"
    if not config_file.is_file():
        raise QwenFtError(f"{src}: no config.json or adapter_config.json; point at a qwen-ft output or a checkpoint")
    quant = json.loads(config_file.read_text()).get("quantization_config")
    if quant:
        method = quant.get("quant_method", "quantized")
        raise QwenFtError(
            f"{src} holds {method} weights, not the full-precision model; export the adapter directory "
            "(qwen-ft merges it into the original-precision base, or the dequantized GPTQ weights, first), "
            "or run `qwen-ft merge ADAPTER --out DIR` and export DIR"
        )


def _export(src: Path, out: Path, dtype: str, name: str | None = None) -> GgufReport:
    from qwen_ft.model.families import resolve_family

    family = resolve_family("auto", src)
    if not family.gguf:
        raise QwenFtError(f"{src}: GGUF export of {family.note} is not supported yet")
    skip = family.frozen
    return write_gguf(src, out, dtype, family.gguf, family.im_start_id, skip, served_template(src), name)


def _merge(src: Path, into: Path) -> None:
    from qwen_ft.export.merge import merge_adapter

    report = merge_adapter(str(src), str(into), overwrite=False)
    print(f"merged the adapter into {report.merged_into} (max |logit diff| {report.merge_diff:.3g})")


def _native(src: Path, into: Path) -> None:
    from qwen_ft.model.qwen_v1 import convert_checkpoint

    convert_checkpoint(src, into)
    print(f"converted the Qwen v1 checkpoint {src} to the native Qwen2 layout it is trained in")


class beside:
    """`make(src, DIR)`'s output, in a temporary directory beside the export (removed after); DIR has src's name."""

    def __init__(self, near: Path, make, src: Path):
        self.near, self.make, self.src = near, make, src

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix=".qwen-ft-export-", dir=self.near))
        try:
            self.make(self.src, self.tmp / self.src.resolve().name)
        except BaseException:  # __exit__ does not run when __enter__ fails
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return self.tmp / self.src.resolve().name

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
