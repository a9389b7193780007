"""`qwen-ft export DIR --to ollama`: the GGUF plus a Modelfile whose Go template renders plain chat as the
trained Jinja template does.

Ollama renders prompts with a Go template, not Jinja. The pieces a Qwen template adds around plain chat
are read from the trained template itself by rendering probes (so a changed template is followed, not
guessed): the default system prompt it inserts when a conversation has none, the generation prompt (with
the run's template arguments, e.g. Qwen3's `enable_thinking: false` empty think block), and a check that
system, user and assistant turns are ChatML blocks. A template that renders plain chat any other way is
refused: Ollama could not serve it as trained. What the Go template does not do: tools, images,
removing the `<think>` part of earlier assistant turns (Qwen3's template drops it from history), and the
Qwen3.5/3.6 templates' trimming of whitespace around message content (detected, and said in the
Modelfile: a message sent with leading or trailing whitespace renders differently).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen_ft.errors import QwenFtError

PROBE = "\ufdd0probe\ufdd1"  # text no conversation holds, to find the template's own additions around it


@dataclass(frozen=True)
class ChatParts:
    """What the template writes around plain ChatML turns."""

    default_system: str | None  # the system prompt it inserts when the conversation has none
    generation: str  # what follows the last turn when asking for an answer ("<|im_start|>assistant\n"...)
    trims: bool = False  # it strips whitespace around message content (Qwen3.5/3.6); the Go template cannot


def render(template: str, messages: list[dict], kwargs: dict) -> str:
    """The Jinja template rendered as transformers renders it (generation prompt on)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=True, **kwargs
    )[0]
    return rendered[0]


def chat_parts(template: str, kwargs: dict) -> ChatParts:
    """Read the default system prompt and the generation prompt off the template; refuse a non-ChatML one.

    Raises:
        QwenFtError: the template does not render plain chat as ChatML blocks.
    """
    user = f"<|im_start|>user\n{PROBE}<|im_end|>\n"
    alone = render(template, [{"role": "user", "content": PROBE}], kwargs)
    if user not in alone:
        raise QwenFtError("the chat template does not render a user turn as a ChatML block; Ollama cannot serve it")
    before, generation = alone.split(user, 1)
    system = None
    if before:
        head, tail = "<|im_start|>system\n", "<|im_end|>\n"
        if not (before.startswith(head) and before.endswith(tail)):
            raise QwenFtError(f"the chat template starts a conversation with {before!r}; Ollama cannot serve it")
        system = before[len(head) : -len(tail)]
    parts = ChatParts(system, generation)
    probe = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    if render(template, probe, kwargs) != chatml(probe, parts):
        raise QwenFtError("the chat template does not render plain chat as ChatML blocks; Ollama cannot serve it")
    padded = [{**m, "content": f" {m['content']}\n"} for m in probe]
    rendered = render(template, padded, kwargs)
    if rendered == chatml(padded, parts):
        return parts
    if rendered == chatml(probe, parts):
        return ChatParts(system, generation, trims=True)
    raise QwenFtError("the chat template rewrites message content; Ollama's Go template cannot serve it alike")


def chatml(messages: list[dict], parts: ChatParts) -> str:
    """Plain ChatML of `messages` as the template renders it (the prompt Ollama must produce)."""
    if messages[0]["role"] != "system" and parts.default_system is not None:
        messages = [{"role": "system", "content": parts.default_system}, *messages]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + parts.generation


def go_template(parts: ChatParts) -> str:
    """The Ollama (Go) template equal to `chatml` for conversations of system, user and assistant turns."""
    turn = '{{- if or (eq .Role "system") (eq .Role "user") (eq .Role "assistant") }}'
    return (
        "{{- range .Messages }}"
        + turn
        + "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{- end }}"
        + parts.generation.replace("{{", '{{ "{{" }}')
    )


def modelfile(gguf_name: str, parts: ChatParts, generation_config: dict) -> str:
    """FROM, TEMPLATE, the default SYSTEM, the stop tokens and the base's sampling defaults."""
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(parts)}"""']
    if parts.trims:  # a Modelfile comment: what differs from the trained template
        lines.insert(0, "# the trained template strips whitespace around each message; this one passes it as sent")
    if parts.default_system is not None:
        lines.append(f'SYSTEM """{parts.default_system}"""')
    lines += ["PARAMETER stop <|im_end|>", "PARAMETER stop <|endoftext|>"]
    for key, name in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("repetition_penalty", "repeat_penalty"),
        ("min_p", "min_p"),
    ):
        if generation_config.get(key) is not None:
            lines.append(f"PARAMETER {name} {generation_config[key]}")
    return "\n".join(lines) + "\n"


def export_ollama(src: str | Path, out: str | Path, dtype: str = "q8_0", overwrite: bool = False) -> Path:
    """Write `out`/model.gguf and `out`/Modelfile; returns `out`.

    Raises:
        QwenFtError: a template Ollama cannot serve as trained, or any GGUF export refusal.
    """
    from qwen_ft.export.gguf.export import export_gguf, served_template
    from qwen_ft.export.servers import template_kwargs

    src, dest = Path(src), Path(out)
    if dest.exists() and not overwrite:
        raise QwenFtError(f"--out {dest} exists; choose a new directory, or pass --overwrite to replace it")
    template = served_template(src)
    if template is None:
        raise QwenFtError(f"{src}: no chat template (chat_template.jinja or tokenizer_config.json)")
    parts = chat_parts(template, template_kwargs(src))
    dest.mkdir(parents=True, exist_ok=True)
    export_gguf(src, dest / "model.gguf", dtype, overwrite=True)
    gen_file = src / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    (dest / "Modelfile").write_text(modelfile("model.gguf", parts, gen), encoding="utf-8")
    return dest
