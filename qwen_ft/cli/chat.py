"""Chat with a model: interactive and streaming, or one answer with --prompt.

Run: qwen-ft chat runs/tiny-merged [--adapter DIR] [--system TEXT] [--prompt TEXT]

Interactive commands: /reset starts a new conversation, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys

from qwen_ft.config.schema import DEFAULT_SYSTEM

HELP = "chat with a model (multi-turn ChatML, streaming); --prompt answers once"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL_DIR [--adapter] [--system] [--prompt] [--max-new-tokens] [--temperature]."""
    p.add_argument("model", help="model directory (a merged model, a full fine-tune, or a LoRA output)")
    p.add_argument("--adapter", help="LoRA adapter to apply on MODEL_DIR")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt")
    p.add_argument("--prompt", help="answer this once and exit")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    """Load once, then answer --prompt or loop over stdin."""
    from qwen_ft.deps import hide_unused, stacks_of_checkpoint
    from qwen_ft.infer.chat import load_chat_model, reply

    hide_unused(stacks_of_checkpoint(args.model) | (stacks_of_checkpoint(args.adapter) if args.adapter else set()))

    model, tok = load_chat_model(args.model, args.adapter)
    history = [("system", args.system)]
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.prompt is not None:
        reply(model, tok, [*history, ("user", args.prompt)], _emit, **gen)
        print()
        return 0
    print("chat: /reset for a new conversation, /exit to quit", file=sys.stderr)
    while True:
        try:
            text = input("\nuser> ").strip()
        except EOFError:
            return 0
        if text == "/exit":
            return 0
        if text == "/reset":
            history = history[:1]
            continue
        if text:
            _emit("assistant> ")
            answer = reply(model, tok, [*history, ("user", text)], _emit, **gen)
            history += [("user", text), ("assistant", answer)]
