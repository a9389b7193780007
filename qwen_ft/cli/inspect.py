"""Show one tokenized conversation with the supervised (learned) tokens highlighted.

Run: qwen-ft inspect --config configs/tiny_cpu_smoke.yaml --index 0
     qwen-ft inspect --tokenizer DIR --data FILE --index 3 --no-color

Learned tokens are shown in green (or between [[ and ]] with --no-color); masked tokens plain.
"""

from __future__ import annotations

import argparse
import sys

from qwen_ft.cli.common import add_data_source_arguments, config_from_args
from qwen_ft.data.chatml import IGNORE_INDEX
from qwen_ft.errors import QwenFtError

HELP = "show one example with its supervised tokens highlighted"
GREEN, RESET = "\x1b[42;30m", "\x1b[0m"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Data source arguments plus --index and --no-color."""
    add_data_source_arguments(p)
    p.add_argument("--index", type=int, default=0, help="which conversation (0-based, across files)")
    p.add_argument("--no-color", action="store_true", help="mark learned spans with [[ ]] instead of colour")


def highlight(tok, ids: list[int], labels: list[int], color: bool) -> str:
    """The decoded text with learned spans marked (each span decoded whole, so UTF-8 stays intact)."""
    from itertools import groupby

    on, off = (GREEN, RESET) if color else ("[[", "]]")
    out = []
    for learned, group in groupby(zip(ids, labels, strict=True), key=lambda p: p[1] != IGNORE_INDEX):
        text = tok.decode([t for t, _ in group])
        out.append(f"{on}{text}{off}" if learned else text)
    return "".join(out)


def run(args: argparse.Namespace) -> int:
    """Render conversation `--index` and print it with stats."""
    from qwen_ft.data.conversations import ReadReport, read_conversations
    from qwen_ft.data.render import Renderer
    from qwen_ft.tokenizer import load_tokenizer

    cfg = config_from_args(args)
    tok = load_tokenizer(cfg.tokenizer_path)
    d = cfg.data
    renderer = Renderer.of(tok, d.chat_template, d.template_kwargs)
    count = 0
    for conv in read_conversations(d.train_files, d.default_system, "skip", ReadReport()):
        count += 1
        if count - 1 == args.index:
            ids, labels, _ = renderer.render(conv.conv, d.label_policy)
            color = not args.no_color and sys.stdout.isatty()
            print(f"{conv.source}  (rendered by {renderer.source})")
            print(
                f"  {len(ids)} tokens, {sum(x != IGNORE_INDEX for x in labels)} learned, "
                f"policy {d.label_policy}, max_length {d.max_length}"
            )
            print(highlight(tok, ids, labels, color))
            return 0
    raise QwenFtError(f"--index {args.index}: the data has only {count} valid conversation(s); use 0..{count - 1}")
