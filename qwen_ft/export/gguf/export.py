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
        with merged_copy(src, out.parent) as merged:
            return _export(merged, out, dtype, name=src.resolve().name)  # named as the adapter, not the temp
    return _export(src, out, dtype)


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
    from qwen_ft.data.template import find_template
    from qwen_ft.model.families import resolve_family

    family = resolve_family("auto", src)
    if not family.gguf:
        raise QwenFtError(f"{src}: GGUF export of {family.note} is not supported yet")
    template = find_template(src)
    skip = family.frozen
    text = template.text if template else None
    return write_gguf(src, out, dtype, family.gguf, family.im_start_id, skip, text, name)


class merged_copy:
    """The adapter in `src` merged into its base, in a temporary directory beside the output (removed after)."""

    def __init__(self, src: Path, near: Path):
        self.src, self.near = src, near

    def __enter__(self) -> Path:
        from qwen_ft.export.merge import merge_adapter

        self.tmp = Path(tempfile.mkdtemp(prefix=".qwen-ft-merge-", dir=self.near))
        try:
            report = merge_adapter(str(self.src), str(self.tmp / "merged"), overwrite=False)
        except BaseException:  # __exit__ does not run when __enter__ fails
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        print(f"merged the adapter into {report.merged_into} (max |logit diff| {report.merge_diff:.3g})")
        return self.tmp / "merged"

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
