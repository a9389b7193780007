"""The Ollama Modelfile's Go template renders every prompt of the bundled conversations as the trained Jinja
template does (checked with the small Go-template renderer below: the `ollama` tool is not installed here),
for each real Qwen chat template; a template that is not plain ChatML is refused."""

from __future__ import annotations

import json
import re

import pytest

from qwen_ft.errors import QwenFtError
from qwen_ft.export.ollama import chat_parts, go_template, modelfile, render
from tests.conftest import ASSETS, REPO

TOKEN = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def go_render(template: str, messages: list[dict], system: str | None) -> str:
    """Ollama's rendering of `template`, for what it uses: a range over .Messages, if/else if/end with eq and
    or, .Role and .Content, string literals, and {{- -}} trimming. Ollama puts the Modelfile's SYSTEM first
    when a request has no system message."""
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    parts, pos = [], 0
    for m in TOKEN.finditer(template):
        parts += [("text", template[pos : m.start()]), ("action", m.groups())]
        pos = m.end()
    parts.append(("text", template[pos:]))
    for i, (kind, value) in enumerate(parts):  # {{- trims the text before, -}} the text after
        if kind == "action" and value[0]:
            parts[i - 1] = ("text", parts[i - 1][1].rstrip())
        if kind == "action" and value[2]:
            parts[i + 1] = ("text", parts[i + 1][1].lstrip())
    out: list[str] = []
    ollama_messages = [{"Role": m["role"], "Content": m["content"]} for m in messages]  # Go's field names
    _run(parts, 0, len(parts), {"Messages": ollama_messages}, out)
    return "".join(out)


def _run(parts, start, stop, ctx, out) -> None:
    i = start
    while i < stop:
        kind, value = parts[i]
        if kind == "text":
            out.append(value)
            i += 1
            continue
        action = value[1]
        if action.startswith("range "):
            end = _matching(parts, i)
            for item in ctx["Messages"]:
                _run(parts, i + 1, end, item, out)
            i = end + 1
        elif action.startswith("if "):
            i = _if(parts, i, ctx, out)
        elif action.startswith('"'):
            out.append(json.loads(action))
            i += 1
        else:
            out.append(str(ctx[action.removeprefix(".")]))
            i += 1


def _if(parts, i, ctx, out) -> int:
    """Run the branch of an if / else if / end whose condition holds; the index after its end."""
    branches, depth, j = [(parts[i][1][1][3:], i + 1)], 0, i + 1
    while True:
        action = parts[j][1][1] if parts[j][0] == "action" else None
        if action and (action.startswith(("if ", "range "))):
            depth += 1
        elif action == "end" and depth:
            depth -= 1
        elif action == "end":
            break
        elif action and action.startswith("else") and not depth:
            branches.append((action[len("else if ") :] if action.startswith("else if") else "true", j + 1))
        j += 1
    ends = [b[1] - 1 for b in branches[1:]] + [j]
    for (condition, begin), finish in zip(branches, ends, strict=True):
        if _holds(condition, ctx):
            _run(parts, begin, finish, ctx, out)
            break
    return j + 1


def _holds(condition: str, ctx) -> bool:
    if condition == "true":
        return True
    if condition.startswith("or "):
        return any(_holds(c, ctx) for c in re.findall(r"\((.*?)\)", condition))
    field, literal = re.fullmatch(r'eq \.(\w+) "(.*)"', condition).groups()
    return ctx[field] == literal


def _matching(parts, i) -> int:
    depth = 0
    for j in range(i + 1, len(parts)):
        action = parts[j][1][1] if parts[j][0] == "action" else ""
        if action.startswith(("if ", "range ")):
            depth += 1
        elif action == "end":
            if not depth:
                return j
            depth -= 1
    raise AssertionError("unclosed range")


def prompts() -> list[list[dict]]:
    """Every prompt a server renders from the bundled conversations: each prefix ending at a user turn."""
    out = []
    for line in (REPO / "data" / "example_chatml.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        out += [messages[: i + 1] for i, m in enumerate(messages) if m["role"] == "user"]
    return out


TEMPLATES = {
    "qwen15": ("tokenizer_config.qwen15.json", {}),
    "qwen25": ("tokenizer_config.qwen25.json", {}),
    "qwen3": ("tokenizer_config.qwen3.json", {}),
    "qwen3 no thinking": ("tokenizer_config.qwen3.json", {"enable_thinking": False}),
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_go_template_renders_every_prompt_as_the_jinja_template(name):
    config, kwargs = TEMPLATES[name]
    template = json.loads((ASSETS / "chat_templates" / config).read_text())["chat_template"]
    parts = chat_parts(template, kwargs)
    go = go_template(parts)
    cases = prompts()
    assert len(cases) >= 10
    for messages in cases:
        assert go_render(go, messages, parts.default_system) == render(template, messages, kwargs), messages
    if name == "qwen25":
        assert parts.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    if name == "qwen3 no thinking":
        assert parts.generation == "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_qwen3_5_templates_render_every_prompt_alike(qwen3_5_dirs):
    """They trim whitespace around message content, which the Go template cannot: detected and said."""
    for directory in qwen3_5_dirs.values():
        template = (directory / "chat_template.jinja").read_text()
        parts = chat_parts(template, {})
        assert parts.trims and modelfile("m.gguf", parts, {}).startswith("# the trained template strips")
        for messages in prompts():
            assert go_render(go_template(parts), messages, parts.default_system) == render(template, messages, {})


def test_modelfile_has_template_stops_system_and_sampling():
    template = json.loads((ASSETS / "chat_templates" / "tokenizer_config.qwen25.json").read_text())["chat_template"]
    text = modelfile(
        "model.gguf",
        chat_parts(template, {}),
        {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
    )
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf" and text.count('TEMPLATE """') == 1  # Qwen2.5 does not trim
    assert 'SYSTEM """You are Qwen, created by Alibaba Cloud. You are a helpful assistant."""' in lines
    for line in (
        "PARAMETER stop <|im_end|>",
        "PARAMETER stop <|endoftext|>",
        "PARAMETER temperature 0.7",
        "PARAMETER top_p 0.8",
        "PARAMETER top_k 20",
        "PARAMETER repeat_penalty 1.05",
    ):
        assert line in lines


def test_a_template_that_is_not_chatml_is_refused():
    llama = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    with pytest.raises(QwenFtError, match="does not render a user turn as a ChatML block"):
        chat_parts(llama, {})
