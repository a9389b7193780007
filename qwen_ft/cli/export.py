"""Export a fine-tuned model for a server: a GGUF file, or an adapter a given server serves as trained.

Run: qwen-ft export runs/tiny-merged --to gguf --dtype q8_0 --out runs/tiny.gguf
     qwen-ft export runs/tiny-lora --to ollama --out runs/tiny-ollama
     qwen-ft export runs/tiny-lora --to llama.cpp-lora --out runs/tiny-lora.gguf
     qwen-ft export runs/tiny-lora --to adapter --for sglang --out runs/tiny-lora-sglang

`--to gguf`: DIR is a merged model, a full fine-tune or a LoRA adapter (merged into its recorded base
first); the GGUF carries the trained chat template, the vocabulary and the stop tokens; K-quants are
made from it with llama.cpp's own llama-quantize. `--to ollama`: that GGUF in DIR plus a Modelfile (its
Go template renders plain chat as the trained template; stop tokens; the base's sampling defaults).
`--to llama.cpp-lora`: the adapter as a GGUF LoRA for llama-server --lora (its scale folded exactly).
`--to adapter --for SERVER`: the adapter checked against that server (refused, with the alternative,
where it would be served wrong), rsLoRA folded into alpha where the server scales by alpha / r, and a
SERVING.md with the exact command.
"""

from __future__ import annotations

import argparse

HELP = "export a model as GGUF, or an adapter for a given server"
TARGETS = ("gguf", "ollama", "llama.cpp-lora", "adapter")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """DIR --to --out [--dtype] [--for] [--overwrite]."""
    from qwen_ft.export.gguf import DTYPES
    from qwen_ft.export.servers import SERVERS

    p.add_argument("model", help="a merged model, full fine-tune or LoRA adapter directory")
    p.add_argument("--to", required=True, choices=TARGETS, help="what to write")
    p.add_argument("--out", required=True, help="the file (gguf) or directory (ollama, adapter) to write")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="f16", help="GGUF tensor type (default f16)")
    p.add_argument("--for", dest="server", choices=tuple(SERVERS), help="the server an adapter is written for")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    """Export and report."""
    from qwen_ft.cli.args import hide_unused_stacks

    hide_unused_stacks(args, set())
    return {"gguf": _gguf, "ollama": _ollama, "llama.cpp-lora": _lora, "adapter": _adapter}[args.to](args)


def _gguf(args: argparse.Namespace) -> int:
    from qwen_ft.export.gguf.export import export_gguf

    r = _gguf_file(args, export_gguf)
    print(f"run it: llama-server -m {r.path} --jinja   (K-quants: llama-quantize {r.path} OUT.gguf Q4_K_M)")
    return 0


def _lora(args: argparse.Namespace) -> int:
    from qwen_ft.export.gguf.lora import export_lora

    r = _gguf_file(args, export_lora)
    print(f"run it: llama-server -m BASE.gguf --lora {r.path} --jinja   (BASE.gguf: qwen-ft export BASE --to gguf)")
    return 0


def _gguf_file(args: argparse.Namespace, export):
    """Run a GGUF writer (gguf package required) and say what it wrote."""
    from qwen_ft.deps import require
    from qwen_ft.files import size

    require("gguf", "GGUF export")
    r = export(args.model, args.out, args.dtype, args.overwrite)
    print(f"wrote {r.path} ({r.arch}, {r.dtype}, {r.tensors} tensors, {size(r.bytes)})")
    return r


def _ollama(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qwen_ft.deps import require
    from qwen_ft.export.ollama import export_ollama

    require("gguf", "GGUF export")
    out = export_ollama(args.model, args.out, args.dtype, args.overwrite)
    print(f"wrote {out / 'model.gguf'} and {out / 'Modelfile'}")
    print(f"run it: cd {out} && ollama create {Path(args.model).resolve().name} -f Modelfile")
    return 0


def _adapter(args: argparse.Namespace) -> int:
    from qwen_ft.export.servers import export_adapter

    out = export_adapter(args.model, args.out, args.server, args.overwrite)
    print(f"wrote the adapter for {args.server} to {out} (commands in {out / 'SERVING.md'})")
    return 0
