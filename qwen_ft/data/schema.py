"""Conversation rows: the two accepted formats and their validation.

Accepted rows (from .json lists or .jsonl lines):
- QwenLM: {"id": ..., "conversations": [{"from": "system"|"user"|"assistant", "value": "..."}]}
  ("human" and "gpt" are accepted as the ShareGPT spellings of user and assistant);
- OpenAI-style: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}.

A system message must come first. Without one, the configured default system prompt is used.
Every problem is reported as `file:line: field: what is wrong; how to fix`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class Conversation:
    """A validated conversation: parallel role and content tuples plus where it came from."""

    roles: tuple[str, ...]
    contents: tuple[str, ...]
    source: str


class RowError(ValueError):
    """One bad row; the message names the field and the fix (the caller adds file:line)."""


def _messages(row: Any) -> tuple[list, str, str, str]:
    """The message list and its key names, for either accepted format."""
    if not isinstance(row, dict):
        raise RowError(f"row is a {type(row).__name__}, expected an object with 'conversations' or 'messages'")
    if "conversations" in row:
        key, role_key, content_key = "conversations", "from", "value"
    elif "messages" in row:
        key, role_key, content_key = "messages", "role", "content"
    else:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(f"no 'conversations' (QwenLM) or 'messages' (OpenAI) list; keys present: {keys}")
    msgs = row[key]
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"'{key}' must be a non-empty list of messages, got {msgs!r:.60}")
    return msgs, key, role_key, content_key


def _message(msg: Any, where: str, role_key: str, content_key: str) -> tuple[str, str]:
    if not isinstance(msg, dict):
        raise RowError(f"{where}: expected an object with '{role_key}' and '{content_key}', got {msg!r:.60}")
    raw = msg.get(role_key)
    role = ROLE_ALIASES.get(raw, raw) if isinstance(raw, str) else raw  # an unhashable role is reported below
    if role not in ROLES:
        raise RowError(f"{where}.{role_key}: unknown role {msg.get(role_key)!r}; use one of {', '.join(ROLES)}")
    content = msg.get(content_key)
    if not isinstance(content, str):
        raise RowError(f"{where}.{content_key}: expected a string, got {type(content).__name__} {content!r:.60}")
    if not content.strip():
        raise RowError(f"{where}.{content_key}: empty {role} message; remove the message or fill it in")
    return role, content


def parse_row(row: Any, source: str, default_system: str) -> Conversation:
    """Validate one raw row and normalise it into a Conversation.

    Args:
        row: the decoded JSON value of one row.
        source: where it came from, e.g. "data/train.jsonl:17" (kept for reports).
        default_system: system prompt to insert when the row has none ("" inserts nothing).

    Returns:
        The conversation, with a leading system message.

    Raises:
        RowError: naming the field (e.g. messages[2].role) and the fix.
    """
    msgs, key, role_key, content_key = _messages(row)
    pairs = [_message(m, f"{key}[{i}]", role_key, content_key) for i, m in enumerate(msgs)]
    for i, (role, _) in enumerate(pairs):
        if role == "system" and i > 0:
            raise RowError(f"{key}[{i}].{role_key}: a system message may only come first; move or drop it")
    if not any(role == "assistant" for role, _ in pairs):
        raise RowError(f"'{key}' has no assistant reply, so nothing would be learned; add one or remove the row")
    if pairs[0][0] != "system" and default_system:
        pairs.insert(0, ("system", default_system))
    roles, contents = zip(*pairs, strict=True)
    return Conversation(tuple(roles), tuple(contents), source)
