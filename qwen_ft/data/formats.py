"""The row formats users bring, normalised into one conversation: OpenAI-style messages, ShareGPT
(with function_call / observation), Qwen v1 JSON, Alpaca and prompt/completion.

A conversation is a dict the chat template reads as a server would:

    {"messages": [{"role", "content", "reasoning_content"?, "tool_calls"?, "name"?, "tool_call_id"?}],
     "tools": [...] or None, "kwargs": {template variables for this row}, "learn": [one bool per
     assistant message]}

A content is a string or a list of {"type": "text", "text"} parts, kept as given: the renderer decides
per template whether the parts are joined (`template.takes_parts`). Image, video and audio parts are
refused (qwen-ft trains text only).

Tool-call arguments given as a JSON string are decoded to an object first, as servers do before
rendering. Message fields qwen-ft does not know are refused (a typo must not silently drop data);
unknown top-level row fields (ids, metadata) are left out and counted in the data report.
"""

from __future__ import annotations

import json
import re
from typing import Any

from qwen_ft.data.chatml import as_text
from qwen_ft.data.schema import Conversation, RowError
from qwen_ft.data.template import strings

SURROGATE = re.compile("[\ud800-\udfff]")
FORMATS = {
    "messages": "OpenAI messages",
    "conversations": "ShareGPT / Qwen v1",
    "instruction": "Alpaca",
    "prompt": "prompt/completion",
}
MESSAGE_KEYS = {"role", "content", "reasoning_content", "tool_calls", "name", "tool_call_id", "weight", "loss"}
# The row fields each format reads; a field another format reads is refused in it (it would be lost),
# any other field (ids, metadata) is left out and counted.
ROW_KEYS = {
    "messages": {"messages", "tools", "chat_template_kwargs"},
    "conversations": {"conversations", "tools", "system", "chat_template_kwargs"},
    "instruction": {"instruction", "input", "output", "system", "history", "chat_template_kwargs"},
    "prompt": {"prompt", "completion", "system", "tools", "chat_template_kwargs"},
}
FORMAT_FIELDS = set().union(*ROW_KEYS.values())
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function_call": "function_call",
}


def normalise(row: Any, default_system: str | None) -> tuple[dict[str, Any], list[str]]:
    """One raw row as a conversation, plus the names of top-level fields that were left out.

    Raises:
        RowError: naming the field and the fix.
    """
    if not isinstance(row, dict):
        raise RowError(f"row is a {type(row).__name__}, expected an object ({', '.join(FORMATS)} ...)", "format")
    _check_text(row)
    found = [k for k in FORMATS if k in row]
    if len(found) != 1:
        keys = ", ".join(sorted(map(str, row))) or "none"
        why = f"has {' and '.join(repr(k) for k in found)}; keep one" if found else f"keys present: {keys}"
        raise RowError(
            f"cannot tell the format: {why} (one of 'messages' (OpenAI), 'conversations' (ShareGPT/Qwen), "
            "'instruction' + 'output' (Alpaca), 'prompt' + 'completion')",
            "format",
        )
    key = found[0]
    misplaced = sorted(k for k in row if k in FORMAT_FIELDS and k not in ROW_KEYS[key])
    if misplaced:
        raise RowError(
            f"{', '.join(misplaced)}: not part of the {FORMATS[key]} format, so it would be lost; "
            f"this format reads {', '.join(sorted(ROW_KEYS[key]))}",
            "format",
        )
    messages = {"messages": _openai, "conversations": _sharegpt, "instruction": _alpaca, "prompt": _prompt}[key](row)
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(
            f"'{key}' has no assistant reply, so nothing would be learned; add one or remove the row", "no_reply"
        )
    if default_system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": default_system})
    conv = {
        "messages": [_for_template(m) for m in messages],
        "tools": _tools(row.get("tools")),
        "kwargs": _kwargs(row.get("chat_template_kwargs")),
        "learn": [_learned(m, i) for i, m in enumerate(messages) if m["role"] == "assistant"],
    }
    return conv, sorted(str(k) for k in row if k not in FORMAT_FIELDS and k != "id")


def _check_text(row: dict) -> None:
    """Refuse text that is not valid Unicode: a lone surrogate (a JSON escape such as \\ud800 without
    its pair) cannot be encoded, written or tokenized."""
    for text in strings(row):
        bad = SURROGATE.search(text)
        if bad:
            raise RowError(
                f"text holds a lone surrogate U+{ord(bad.group()):04X} (near {text[:40]!r}); fix the "
                "\\u escape in the file (pairs such as \\ud83d\\ude00 are fine)",
                "encoding",
            )


def _openai(row: dict) -> list[dict]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"'messages' must be a non-empty list of messages, got {msgs!r:.60}", "message")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(msgs)]


def _message(msg: Any, where: str) -> dict:
    """One OpenAI-style message, checked and normalised."""
    if not isinstance(msg, dict):
        raise RowError(f"{where}: expected an object with 'role' and 'content', got {msg!r:.60}", "message")
    msg = {k: v for k, v in msg.items() if v is not None or k == "content"}  # a null field is an absent one
    unknown = sorted(str(k) for k in msg if k not in MESSAGE_KEYS)
    if unknown:
        raise RowError(
            f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(MESSAGE_KEYS))}", "message"
        )
    role = msg.get("role")
    if role not in ("system", "user", "assistant", "tool"):
        raise RowError(f"{where}.role: unknown role {role!r}; use one of system, user, assistant, tool", "message")
    out = {**msg, "content": _content(msg.get("content"), f"{where}.content", role, bool(msg.get("tool_calls")))}
    if "tool_calls" in msg:
        if role != "assistant":
            raise RowError(f"{where}.tool_calls: only assistant messages call tools", "tools")
        out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(msg["tool_calls"] or [])]
    if "reasoning_content" in msg and not isinstance(msg["reasoning_content"], (str, type(None))):
        raise RowError(f"{where}.reasoning_content: expected a string", "message")
    for flag in ("weight", "loss"):
        if flag in msg and role != "assistant":
            raise RowError(
                f"{where}.{flag}: only assistant messages are learned; remove it from this {role} message", "field"
            )
    return out


def _content(content: Any, where: str, role: str, has_calls: bool) -> str | list[dict]:
    """A string, or a list of text parts kept as a list: the renderer gives it to a template that loops
    over content parts (Qwen3.5/3.6 concatenate them) and joins it with newlines for the others, as
    servers do (`template.takes_parts`). Image, video and audio parts are refused."""
    if isinstance(content, list):
        content = [_text_part(part, f"{where}[{i}]") for i, part in enumerate(content)]
    if content in (None, "", []) and has_calls:  # a reply that only calls tools
        return ""
    if not isinstance(content, (str, list)):
        raise RowError(f"{where}: expected a string, got {type(content).__name__} {content!r:.60}", "content")
    if not as_text(content).strip() and not has_calls:
        raise RowError(f"{where}: empty {role} message; remove the message or fill it in", "content")
    return content


# Media part types (OpenAI's, and the Qwen-VL/transformers spelling) and the keys a typeless part names them by.
MEDIA = ("image", "image_url", "video", "video_url", "audio", "audio_url", "input_audio")


def _text_part(part: Any, where: str) -> dict:
    """{"type": "text", "text": ...} from one content part; a media part is refused saying why and how to fix."""
    kind = part.get("type") if isinstance(part, dict) else None
    media = kind if kind in MEDIA else next((k for k in MEDIA if isinstance(part, dict) and k in part), None)
    if media:
        article = "an" if media[0] in "aeiou" else "a"
        raise RowError(
            f"{where}: {article} {media} part{_media_name(part, media)}; qwen-ft trains the language "
            "model of vision-language checkpoints (Qwen3.5/3.6) on text only, so images, video and "
            "audio cannot be learned from. Remove the media part (or the row), or set "
            "data.on_error=skip to skip such rows (they are counted in the data report)",
            "media",
        )
    if kind != "text" or not isinstance(part.get("text"), str):
        raise RowError(
            f"{where}: a {kind or type(part).__name__} part; qwen-ft trains text models, so "
            'only {"type": "text", "text": ...} parts are accepted',
            "content",
        )
    return {"type": "text", "text": part["text"]}


def _media_name(part: dict, media: str) -> str:
    """The file or URL a media part points at, as " (cat.png)", so the user can find it; "" for inline data."""
    ref = part.get(media) or part.get("url") or part.get("path")
    ref = ref.get("url") if isinstance(ref, dict) else ref
    return f" ({ref:.80})" if isinstance(ref, str) and ref and not ref.startswith("data:") else ""


def _tool_call(call: Any, where: str) -> dict:
    """{"type": "function", "function": {"name", "arguments": object}} (plus its "id") from either common
    spelling; unknown keys are refused (a misspelt "argument" must not become empty arguments)."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RowError(
            f'{where}: expected {{"function": {{"name": ..., "arguments": ...}}}}, got {call!r:.80}', "tools"
        )
    outer = set(call) - ({"type", "function", "id"} if "function" in call else {"type", "name", "arguments", "id"})
    inner = set(fn) - {"name", "arguments"} if fn is not call else set()
    if outer or inner:
        raise RowError(
            f"{where}: unknown field(s) {', '.join(sorted(map(str, outer | inner)))}; a tool call has "
            "type, id and function {name, arguments}",
            "tools",
        )
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise RowError(
                f"{where}.arguments: not valid JSON ({e.msg}); give an object or a JSON string", "tools"
            ) from None
    if not isinstance(args, dict):
        raise RowError(f"{where}.arguments: expected an object, got {type(args).__name__}", "tools")
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if "id" in call:
        out["id"] = call["id"]
    return out


def _sharegpt(row: dict) -> list[dict]:
    """ShareGPT / Qwen v1: {"from", "value"} turns; function_call turns become the assistant's tool calls."""
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RowError(f"'conversations' must be a non-empty list of turns, got {turns!r:.60}", "message")
    system = row.get("system")
    out = [{"role": "system", "content": _content(system, "system", "system", False)}] if system else []
    for i, t in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(t, dict) or set(t) - {"from", "value", "weight", "loss"}:
            raise RowError(
                f"{where}: expected an object with 'from' and 'value' (and optionally 'weight'), got {t!r:.60}",
                "message",
            )
        speaker = t.get("from")
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise RowError(
                f"{where}.from: unknown speaker {t.get('from')!r}; use one of {', '.join(SHAREGPT_ROLES)}", "message"
            )
        if role == "function_call":  # one call, or a JSON list of parallel calls
            value = _json_value(t.get("value"), f"{where}.value")
            for j, call in enumerate(value if isinstance(value, list) else [value]):
                _add_call(out, _tool_call(call, f"{where}.value[{j}]"), t)
            continue
        msg = {"role": role, "content": t.get("value")}
        msg.update({k: t[k] for k in ("weight", "loss") if k in t})
        out.append(_message(msg, where))
    return out


def _add_call(out: list[dict], call: dict, turn: dict) -> None:
    """A function_call turn: a tool call of the assistant message it follows, or its own message."""
    flags = {k: turn[k] for k in ("weight", "loss") if k in turn}
    if out and out[-1]["role"] == "assistant":
        if any(out[-1].get(k, v) != v for k, v in flags.items()):
            raise RowError(
                "a function_call turn's weight/loss differs from the reply it belongs to; make them equal", "field"
            )
        out[-1].setdefault("tool_calls", []).append(call)
        out[-1].update(flags)
    else:
        out.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call],
                **{k: turn[k] for k in ("weight", "loss") if k in turn},
            }
        )


def _json_value(value: Any, where: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(
                f'{where}: a function_call must be JSON {{"name", "arguments"}} ({e.msg})', "tools"
            ) from None
    return value


def _alpaca(row: dict) -> list[dict]:
    """instruction (+ input), output, optional system and history [[user, assistant], ...]."""
    if "output" not in row:
        raise RowError("Alpaca row without 'output'; add the answer or remove the row", "format")
    out = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    history = row.get("history") or []
    if not isinstance(history, list) or any(not isinstance(h, list) or len(h) != 2 for h in history):
        raise RowError("'history' must be a list of [user, assistant] pairs", "format")
    for user, answer in history:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    for key in ("instruction", "input"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise RowError(f"{key}: expected a string, got {type(row[key]).__name__}", "content")
    prompt = "\n".join(x for x in (row.get("instruction"), row.get("input")) if x)
    out += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return [_message(m, f"alpaca {m['role']}") for m in out]


def _prompt(row: dict) -> list[dict]:
    """prompt/completion: strings (one user turn, one reply) or message lists."""
    if "completion" not in row:
        raise RowError("'prompt' without 'completion'; add the answer or remove the row", "format")
    parts = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = row[key]
        msgs = value if isinstance(value, list) else [{"role": role, "content": value}]
        # only the completion is learned: replies inside a prompt are context (few-shot examples)
        parts += [
            {
                **_message(m, f"{key}[{i}]"),
                **({"weight": 0} if key == "prompt" and m.get("role") == "assistant" else {}),
            }
            for i, m in enumerate(msgs)
        ]
    return parts


def _tools(tools: Any) -> list | None:
    """The row's tool list (a JSON string is decoded, as ShareGPT files store it)."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RowError(f"tools: not valid JSON ({e.msg})", "tools") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("tools: expected a list of tool (function schema) objects", "tools")
    return tools


def _kwargs(kwargs: Any) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise RowError('chat_template_kwargs: expected an object, e.g. {"enable_thinking": false}', "field")
    return kwargs


def _learned(msg: dict, _index: int) -> bool:
    """False for an assistant message marked `weight: 0` or `loss: false`."""
    weight, loss = msg.get("weight", 1), msg.get("loss", True)
    if weight not in (0, 1) or not isinstance(loss, bool):
        raise RowError(f"weight {weight!r} / loss {loss!r}: use weight 0 or 1, loss true or false", "field")
    return bool(weight) and loss


def _for_template(msg: dict) -> dict:
    """The message as the template sees it (qwen-ft's own switches removed)."""
    return {k: v for k, v in msg.items() if k not in ("weight", "loss")}


def parse_row(row: Any, source: str, default_system: str | None) -> Conversation:
    """Validate one raw row and normalise it.

    Args:
        row: the decoded JSON value of one row.
        source: where it came from, e.g. "data/train.jsonl:17" (kept for reports).
        default_system: system prompt to insert when the row has none ("" or None: the template's own).

    Raises:
        RowError: naming the field (e.g. messages[2].role) and the fix.
    """
    conv, ignored = normalise(row, default_system)
    return Conversation(conv, source, tuple(ignored))
