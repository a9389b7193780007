"""Chat with a model: interactive and streaming, or one answer with --prompt.

Run: qwen-ft chat runs/tiny-merged [--adapter DIR] [--system TEXT] [--no-think] [--prompt TEXT]

Prompts are rendered by the model's own chat template, as training rendered them and as a server
would. Interactive commands: /help, /reset (new conversation), /exit. Ctrl-C stops the answer being
written (the chat goes on); Ctrl-D or /exit ends the chat.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

HELP = "chat with a model (its own chat template, streaming); --prompt answers once"
COMMANDS = "/help this list, /reset start a new conversation, /exit quit (or Ctrl-D); Ctrl-C stops an answer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL_DIR [--adapter] [--system] [--no-think] [--prompt] [--max-new-tokens] [--temperature]."""
    p.add_argument("model", help="model directory (a merged model, a full fine-tune, or a LoRA output)")
    p.add_argument("--adapter", help="LoRA adapter to apply on MODEL_DIR")
    p.add_argument("--system", help="system prompt (default: the chat template's own, if it has one)")
    p.add_argument(
        "--no-think", action="store_true", help="answer without thinking (Qwen3 templates: enable_thinking=false)"
    )
    p.add_argument("--prompt", help="answer this once and exit")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument(
        "--allow-pickle-weights",
        action="store_true",
        help="load .bin (torch pickle) weights when there are no safetensors (unpickling can run code)",
    )


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    """Load once, then answer --prompt or loop over stdin."""
    from qwen_ft.cli.args import hide_unused_stacks
    from qwen_ft.deps import stacks_of_checkpoint
    from qwen_ft.infer.chat import load_chat_model, reply

    hide_unused_stacks(
        args, stacks_of_checkpoint(args.model) | (stacks_of_checkpoint(args.adapter) if args.adapter else set())
    )
    model, tok = load_chat_model(args.model, args.adapter, args.allow_pickle_weights)
    start = [{"role": "system", "content": args.system}] if args.system else []
    gen = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "template_kwargs": {"enable_thinking": False} if args.no_think else None,
    }

    def answer(messages: list[dict]) -> str:
        return reply(model, tok, messages, _emit, **gen)

    if args.prompt is not None:
        answer([*start, {"role": "user", "content": args.prompt}])
        print()
        return 0
    return chat_loop(start, answer, input)


def chat_loop(start: list[dict], answer: Callable[[list[dict]], str], read: Callable[[str], str]) -> int:
    """The interactive loop: commands, Ctrl-C stops one answer, Ctrl-D ends the chat."""
    print(f"chat: {COMMANDS}", file=sys.stderr)
    history = list(start)
    while True:
        try:
            text = read("\nuser> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-C stops an answer; /exit or Ctrl-D ends the chat)", file=sys.stderr)
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/help":
            print(COMMANDS, file=sys.stderr)
        elif text == "/reset":
            history = list(start)
            print("(new conversation)", file=sys.stderr)
        elif text.startswith("/"):
            print(f"unknown command {text}; {COMMANDS}", file=sys.stderr)
        elif text:
            history = _turn(history, text, answer)


def _turn(history: list[dict], text: str, answer: Callable[[list[dict]], str]) -> list[dict]:
    """One user turn; an answer stopped with Ctrl-C is dropped, with the question."""
    _emit("assistant> ")
    try:
        said = answer([*history, {"role": "user", "content": text}])
    except KeyboardInterrupt:
        print("\n(answer stopped)", file=sys.stderr)
        return history
    return [*history, {"role": "user", "content": text}, {"role": "assistant", "content": said}]
