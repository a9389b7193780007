"""Rendering through the checkpoint's own chat template, token for token as servers render it.

The template is the one every server reads: `chat_template.jinja` in the tokenizer directory, or
`tokenizer_config.json`'s `chat_template` (`data.chat_template` may name another file). It is
rendered with transformers' own Jinja environment, so the text equals `apply_chat_template`'s.
The text is then encoded with control tokens recognised only where the template wrote them:

    ids(conversation) == tokenizer.apply_chat_template(messages, tools=..., tokenize=True, **kwargs)

for every conversation whose strings hold no special-token text. Where a message does contain
special-token text such as "<|im_end|>", qwen-ft encodes it as ordinary text (a user cannot forge a
turn end); apply_chat_template would encode a control token there. That is the one known difference.
Content given as a list of text parts reaches the template as servers pass it: as the list where the
template loops over content parts (Qwen3.5/3.6), else joined with newlines (`takes_parts`).

Label rule (what is learned): the rendered ids are cut into blocks, each from a `<|im_start|>` to
its `<|im_end|>`. A block's header is its role name and the newline after it. With the default
policy `assistant`, every assistant block is learned from the first token after its header through
its `<|im_end|>`, exactly as the template rendered it (a Qwen3 `<think>` block, tool calls and all);
a token that begins inside the header is not learned. Everything else is masked: system, user and
tool blocks, the headers, and the newline after each `<|im_end|>`. `last_turn` learns only the last
assistant block; `qwen_reference` adds QwenLM's learned `<|im_start|>` and `<|im_end|>` + newline of
every block. An assistant message with `weight: 0` or `loss: false` is not learned. The n-th
assistant block belongs to the n-th assistant message; a template that renders them in any other
number is refused for that row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_ft.data.chatml import Block, as_text
from qwen_ft.errors import QwenFtError

# Unicode noncharacters: never valid text in interchange, so they can mark user-written special-token
# text through the template without colliding with data (a row holding them is refused).
MARK_OPEN, MARK_CLOSE = "\ufdd0", "\ufdd1"


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template's Jinja source and where it was found; `tool_use`: the named "tool_use" template
    of a tokenizer_config.json that lists several, which apply_chat_template renders conversations
    with tools through."""

    text: str
    source: str
    tool_use: ChatTemplate | None = None


def find_template(tokenizer_dir: str | Path, override: str | None = None) -> ChatTemplate | None:
    """The template servers would use for `tokenizer_dir` (or the `override` file); None when it has none.

    Raises:
        QwenFtError: an override file that is missing, or a tokenizer_config.json that is not JSON.
    """
    if override:
        path = Path(override)
        if not path.is_file():
            raise QwenFtError(f"data.chat_template: file {override!r} not found; name a .jinja file or remove it")
        return ChatTemplate(_template_text(path), str(path))
    d = Path(tokenizer_dir)
    if (d / "chat_template.jinja").is_file():
        # transformers 5 saves named templates beside it: additional_chat_templates/NAME.jinja
        extra = d / "additional_chat_templates" / "tool_use.jinja"
        tool_use = ChatTemplate(extra.read_text(encoding="utf-8"), str(extra)) if extra.is_file() else None
        return ChatTemplate(
            (d / "chat_template.jinja").read_text(encoding="utf-8"), str(d / "chat_template.jinja"), tool_use
        )
    config = d / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except ValueError as e:
        raise QwenFtError(f"{config}: not valid JSON ({e}); restore the checkpoint's tokenizer_config.json") from None
    named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)} if isinstance(raw, list) else {}
    tools = named.get("tool_use")
    tool_use = ChatTemplate(tools, f"{config} (chat_template 'tool_use')") if isinstance(tools, str) else None
    raw = named.get("default") if named else raw  # several named templates: "default", and "tool_use" for tools
    if not (isinstance(raw, str) and raw.strip()):
        return tool_use and ChatTemplate(tool_use.text, tool_use.source)  # apply_chat_template needs tools then
    return ChatTemplate(raw, f"{config} (chat_template)", tool_use)


def record_template(out: Path, text: str, kwargs: dict | None = None) -> None:
    """Write the template that rendered a run's data where every server finds it: `chat_template.jinja`,
    and in place of the one `tokenizer_config.json` may carry (the gguf package, hence llama.cpp and Ollama,
    reads that first; a list of named templates keeps its others, with "default" replaced). With the run's
    `kwargs` (data.template_kwargs) as the template's defaults, see `with_defaults`, in every copy."""
    kwargs = kwargs or {}
    (out / "chat_template.jinja").write_text(with_defaults(text, kwargs), encoding="utf-8")
    extra = out / "additional_chat_templates" / "tool_use.jinja"
    if kwargs and extra.is_file():
        extra.write_text(with_defaults(extra.read_text(encoding="utf-8"), kwargs), encoding="utf-8")
    config_file = out / "tokenizer_config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    raw = config.get("chat_template")
    if isinstance(raw, list):
        named = [
            {**t, "template": with_defaults(t["template"], kwargs)}
            for t in raw
            if isinstance(t, dict) and t.get("name") != "default" and isinstance(t.get("template"), str)
        ]
        config["chat_template"] = [{"name": "default", "template": with_defaults(text, kwargs)}, *named]
    else:
        config["chat_template"] = with_defaults(text, kwargs)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def with_defaults(text: str, kwargs: dict) -> str:
    """`text` with `kwargs` as the defaults of its variables. Servers read a checkpoint's template but not
    the arguments a run rendered its data with (`enable_thinking: false`), so those become the template's
    own: rendered without them it gives what `text` gives with them, and a request that passes one still
    sets it. Jinja's `if` opens no scope, so the `set` inside it sets the template's variable.

    Raises:
        QwenFtError: a value that has no Jinja literal (data.template_kwargs takes JSON-like values).
    """
    head = "".join(
        f"{{%- if {k} is not defined %}}{{%- set {k} = {jinja_literal(k, v)} %}}{{%- endif %}}"
        for k, v in sorted(kwargs.items())
    )
    return head + text


def jinja_literal(name: str, value: Any) -> str:
    """`value` written as a Jinja expression, checked by evaluating it back.

    Raises:
        QwenFtError: naming data.template_kwargs.`name`, for a value Jinja cannot spell or reads back otherwise.
    """
    import jinja2

    def spell(v: Any) -> str:
        if v is None or isinstance(v, bool):
            return {None: "none", True: "true", False: "false"}[v]
        if isinstance(v, (int, float, str)):
            return json.dumps(v)  # JSON's number and string escapes are Jinja's (Python's) too
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(spell(x) for x in v) + "]"
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return "{" + ", ".join(f"{json.dumps(k)}: {spell(x)}" for k, x in v.items()) + "}"
        raise TypeError

    try:
        text = spell(value)
        same = jinja2.Environment().compile_expression(text)() == (list(value) if isinstance(value, tuple) else value)
    except (TypeError, ValueError, jinja2.TemplateError):
        same = False
    if not same:
        raise QwenFtError(
            f"data.template_kwargs.{name}: {value!r} cannot be written into the chat template as its default; "
            "use strings, numbers, booleans, null, lists and mappings"
        )
    return text


def special_token_variables(tokenizer_dir: str | Path) -> dict[str, str]:
    """bos_token, eos_token, ... as tokenizer_config.json names them: apply_chat_template offers them to
    the template (a template may write `{{ eos_token }}`)."""
    try:
        config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def _template_text(path: Path) -> str:
    """A .jinja file's text, or the chat_template of a tokenizer_config.json given instead."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        found = json.loads(text).get("chat_template")
        if not isinstance(found, str):
            raise QwenFtError(f"data.chat_template: {path} has no string chat_template")
        return found
    return text


# sha256 of the templates Qwen ships (Qwen1.5-Chat, Qwen2.5-Instruct, Qwen3, Qwen3.5, Qwen3.6) and of qwen-ft's Qwen v1
# ChatML: read and found to use plain data access only, so they render outside Jinja's sandbox, whose
# attribute checks cost more than half of a render. Any other template is untrusted code and renders
# in transformers' own sandboxed environment. Both give the same text (tests/integration/test_templates.py
# compares the vetted ones with apply_chat_template, which renders sandboxed).
VETTED = {
    "af9c0233881b083b52ff773580215222b5440ac3d0beeeca99b76329b048f8db",  # Qwen1.5-Chat
    "55b2f4a26ac9ee719330a61a0c39d9e538b0e9322212f048326318cff4f8674a",  # Qwen2.5-Instruct
    "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5",  # Qwen3
    "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715",  # Qwen3.5 (qwen35.jinja)
    "e84f32a23fdda27689f868aa4a1a5621f41133e51a48d7f3efcbea2839574259",  # Qwen3.6 (qwen36.jinja)
    "1dd84330c29324fc6ef7a1e2479bb6c6848ae13d270c385ab7f6df369385f814",  # Qwen v1 ChatML (tokenizer/convert.py)
}


def compile_template(text: str):
    """The compiled template: transformers' sandboxed one, or for a vetted template the same settings
    (trim_blocks, lstrip_blocks, loop controls, transformers' tojson) without the sandbox."""
    import hashlib

    if hashlib.sha256(text.encode()).hexdigest() not in VETTED:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(text)
    import jinja2
    import jinja2.ext

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(text)


def takes_parts(env, text: str) -> bool:
    """Whether a template loops over a message's content itself (`for item in content`, `for part in
    message.content`), as Qwen3.5/3.6's do (concatenating the text parts with no separator). Servers
    decide the same way from the template's syntax tree (vLLM's "openai" vs "string" content format,
    which looks for such loops): a template that loops is given list content as is; any other gets the
    text parts joined with newlines, since it concatenates content as a string."""
    from jinja2 import nodes

    def is_content(node) -> bool:
        while isinstance(node, (nodes.Filter, nodes.Test)) and node.node is not None:  # `content | list`
            node = node.node
        if isinstance(node, nodes.Getitem):  # message['content']
            return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
        return (isinstance(node, nodes.Name) and node.name == "content") or (
            isinstance(node, nodes.Getattr) and node.attr == "content"
        )

    return any(is_content(loop.iter) for loop in env.parse(text).find_all(nodes.For))


def _as_served(message: dict[str, Any], parts: bool) -> dict[str, Any]:
    """A message as a server hands it to apply_chat_template: reasoning under both names (transformers
    offers both), and list content joined into one string unless the template loops over `parts`."""
    if message.get("reasoning_content") is not None:
        message = {"thinking": message["reasoning_content"], **message}
    if not parts and isinstance(message.get("content"), list):
        message = {**message, "content": as_text(message["content"])}
    return message


class TemplateRenderer:
    """Renders normalised conversations through one template and encodes them for one tokenizer."""

    def __init__(self, template: ChatTemplate, specials: dict[str, int], encode_offsets, kwargs: dict | None = None):
        """`specials`: special-token text -> id (the control tokens); `encode_offsets(texts)` -> a list of
        (ids, tokens_before) per text, encoding special-token text as ordinary text; tokens_before(c)
        counts the tokens that begin before character c."""
        self.template, self.specials, self.encode_offsets = template, specials, encode_offsets
        self.kwargs = dict(kwargs or {})
        alternatives = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) or "(?!)"
        self._control = re.compile(f"({alternatives})")
        marks = f"{MARK_OPEN}{MARK_CLOSE}"
        self._marked = re.compile(f"{MARK_OPEN}({alternatives}){MARK_CLOSE}|({alternatives})|[{marks}]")
        self.im_start, self.im_end = specials["<|im_start|>"], specials["<|im_end|>"]
        self._template = None
        self._parts = False  # whether the template loops over content parts (read when compiled)

    def text(self, conversation: dict[str, Any], add_generation_prompt: bool = False) -> str:
        """The template's text for {"messages", "tools", "kwargs"}, as apply_chat_template renders it:
        transformers' own compiled template and sandboxed Jinja environment. Its wrapper
        (`render_jinja_template`) would only copy the messages into plain JSON types, which
        `formats.normalise` already made them."""
        kwargs = {**self.kwargs, **(conversation.get("kwargs") or {})}
        template = self._compiled()
        messages = [_as_served(m, self._parts) for m in conversation["messages"]]
        return template.render(
            messages=messages,
            tools=conversation.get("tools"),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )

    def _compiled(self):
        if self._template is None:
            self._template = compile_template(self.template.text)
            self._parts = takes_parts(self._template.environment, self.template.text)
        return self._template

    def encode(
        self, conversation: dict[str, Any], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[Block]]:
        """Ids of the rendered conversation and its blocks.

        Raises:
            ValueError: a string holding the noncharacters used as marks (a row error).
        """
        segments = self.segments(conversation, add_generation_prompt)
        texts = [s for s in segments if isinstance(s, str)]
        return self.assemble(segments, iter(self.encode_offsets(texts)), add_generation_prompt)

    def segments(self, conversation: dict[str, Any], add_generation_prompt: bool = False) -> list[str | int]:
        """The rendered conversation as runs of ordinary text and control-token ids (see `encode`)."""
        marked = self._mark(conversation)
        return self._segments(self.text(marked, add_generation_prompt), marked is not conversation)

    def assemble(
        self, segments: list[str | int], encoded, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[Block]]:
        """Ids and blocks from `segments` and an iterator over the (ids, offsets) of their text runs.

        Raises:
            ValueError: a turn that the template never closes, or opens inside another (a row error).
        """
        ids: list[int] = []
        headers: dict[int, tuple[int, str]] = {}  # block start index -> (first content index, role)
        controls: list[int] = []  # positions of the control tokens (all turn marks are among them)
        for seg in segments:
            if isinstance(seg, int):
                controls.append(len(ids))
                ids.append(seg)
                continue
            piece_ids, tokens_before = next(encoded)
            if ids and ids[-1] == self.im_start:
                header = seg.find("\n") + 1 or len(seg)
                headers[len(ids) - 1] = (len(ids) + tokens_before(header), seg[:header].strip())
            ids += piece_ids
        return ids, self._blocks(ids, controls, headers, add_generation_prompt)

    def _mark(self, conversation: dict[str, Any]) -> dict[str, Any]:
        """`conversation` with special-token text in its strings wrapped in marks (itself when none)."""
        texts = list(strings(conversation))
        if any(MARK_OPEN in s or MARK_CLOSE in s for s in texts):
            raise ValueError("text holds the Unicode noncharacters U+FDD0/U+FDD1; remove them")
        if not any(self._control.search(s) for s in texts):
            return conversation
        return _map_strings(conversation, lambda s: self._control.sub(f"{MARK_OPEN}\\1{MARK_CLOSE}", s))

    def _segments(self, text: str, marked: bool) -> list[str | int]:
        """Rendered text as runs of ordinary text (str) and control-token ids (int)."""
        if not marked:
            parts = self._control.split(text)
            return [self.specials[p] if i % 2 else p for i, p in enumerate(parts) if p]
        out: list[str | int] = []
        pos = 0
        for m in self._marked.finditer(text):
            _add_text(out, text[pos : m.start()])
            if m.group(2):
                out.append(self.specials[m.group(2)])
            else:  # a user's special-token text (mark dropped), or a lone mark a template split off
                _add_text(out, m.group(1) or "")
            pos = m.end()
        _add_text(out, text[pos:])
        return out

    def _blocks(
        self, ids: list[int], controls: list[int], headers: dict[int, tuple[int, str]], prompt: bool
    ) -> list[Block]:
        """Every `<|im_start|>` with its role, first content index and `<|im_end|>`; with a generation
        `prompt` the open block at the end runs to the last id. Only the control positions are read:
        text never holds a control token."""
        blocks: list[Block] = []
        start = None
        for i in controls + ([len(ids)] if prompt else []):
            t = ids[i] if i < len(ids) else self.im_end
            if t == self.im_start:
                if start is not None:
                    raise ValueError(
                        "the chat template opens a turn inside another (<|im_start|> before "
                        "<|im_end|>), so its turns cannot be told apart"
                    )
                start = i
            elif t == self.im_end and start is not None:
                body, role = headers.get(start, (start + 1, ""))
                blocks.append(Block(role, start, body, min(i, len(ids) - 1)))
                start = None
        if start is not None:
            raise ValueError(
                "the chat template leaves the last turn without <|im_end|>, so where a reply ends cannot be learned"
            )
        return blocks


def _add_text(out: list[str | int], text: str) -> None:
    """Append ordinary text, joined with a preceding text run (they are encoded as one)."""
    if not text:
        return
    if out and isinstance(out[-1], str):
        out[-1] += text
    else:
        out.append(text)


def strings(value: Any):
    """Every string inside a JSON-like value, dict keys included (tool-call arguments render their keys)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)


def _map_strings(value: Any, fn) -> Any:
    """A copy of a JSON-like value with `fn` applied to every string, dict keys included."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {(fn(k) if isinstance(k, str) else k): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value
