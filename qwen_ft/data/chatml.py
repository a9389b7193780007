"""ChatML rendering and label masking: pure functions, no torch.

Each message renders as `<|im_start|>{role}\\n{content}<|im_end|>\\n`, every piece encoded on
its own so BPE never merges across the framing:

    ids = [im_start] + enc(role) + enc("\\n") + enc(content) + [im_end] + enc("\\n")

`enc` is ordinary encoding: special-token look-alikes inside content stay text. Content given as
a list of text parts is one string here, the parts joined with newlines (`as_text`).

Label policies (IGNORE_INDEX = -100 marks tokens that are not learned; a label equals the
input id where it is learned; the causal shift happens in the loss):

- `assistant` (default): learn each assistant reply's content and its closing `<|im_end|>`.
  Everything else is masked: all framing of system/user turns, their content, the assistant
  header (`<|im_start|>assistant\\n`) and the newline after `<|im_end|>` (the model stops at
  `<|im_end|>`; the newline is context the next turn's prompt always supplies).
- `last_turn`: as `assistant`, but only the final assistant reply is learned; earlier replies
  are context.
- `qwen_reference`: QwenLM's finetune.py masking, token for token. In *every* message
  (system, user and assistant) the leading `<|im_start|>` and the closing `<|im_end|>` + newline
  are learned; the role name and the newline after it are masked; assistant content is learned;
  system and user content is masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from qwen_ft.data.schema import RowError

IGNORE_INDEX = -100
Policy = Literal["assistant", "last_turn", "qwen_reference"]
POLICIES: tuple[str, ...] = ("assistant", "last_turn", "qwen_reference")


def as_text(content: str | list[dict]) -> str:
    """A message's content as one string: a list of text parts joined with newlines, as servers join
    them for a template that concatenates content as a string (ChatML, Qwen1.5/2.5/3)."""
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)


class _Encoder(Protocol):
    im_start_id: int
    im_end_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Framing:
    """The content-independent ids of ChatML for one tokenizer."""

    im_start: int
    im_end: int
    newline: tuple[int, ...]
    role_ids: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, tok: _Encoder) -> Framing:
        """Framing ids of `tok` (role names and newline encoded as ordinary text)."""
        roles = {r: tuple(tok.encode(r)) for r in ("system", "user", "assistant")}
        return cls(tok.im_start_id, tok.im_end_id, tuple(tok.encode("\n")), roles)

    def head(self, role: str) -> list[int]:
        """`<|im_start|>{role}\\n`."""
        return [self.im_start, *self.role_ids[role], *self.newline]

    def tail(self) -> list[int]:
        """`<|im_end|>\\n`."""
        return [self.im_end, *self.newline]

    def message_length(self, role: str, n_content: int) -> int:
        """Token count of one rendered message with `n_content` content tokens."""
        return 1 + len(self.role_ids[role]) + len(self.newline) + n_content + 1 + len(self.newline)


@dataclass(frozen=True)
class Block:
    """One `<|im_start|>` ... `<|im_end|>` span of the ids: [start, end] inclusive, content from `body`."""

    role: str
    start: int
    body: int
    end: int


def chatml_blocks(roles: list[str], contents: list[list[int]], framing: Framing) -> list[Block]:
    """The blocks of a ChatML rendering made by `assemble`."""
    blocks, pos = [], 0
    for role, content in zip(roles, contents, strict=True):
        body = pos + len(framing.head(role))
        blocks.append(Block(role, pos, body, body + len(content)))
        pos += framing.message_length(role, len(content))
    return blocks


def labels_of(ids: list[int], blocks: list[Block], learn: list[bool], policy: Policy) -> list[int]:
    """Labels under `policy` (the rule in this module's docstring and template.py's).

    Raises:
        RowError: the template rendered a different number of assistant turns than the row has.
    """
    labels = [IGNORE_INDEX] * len(ids)
    replies = [b for b in blocks if b.role == "assistant"]
    if len(replies) != len(learn):
        raise RowError(
            f"the chat template renders {len(replies)} assistant turn(s) for {len(learn)} assistant "
            "message(s), so per-message learning cannot be matched; check the messages' roles",
            "template",
        )
    for j, b in enumerate(replies):
        if learn[j] and (policy != "last_turn" or j == len(replies) - 1):
            labels[b.body : b.end + 1] = ids[b.body : b.end + 1]
    if policy == "qwen_reference":
        for k, b in enumerate(blocks):
            nxt = blocks[k + 1].start if k + 1 < len(blocks) else len(ids)
            labels[b.start] = ids[b.start]
            labels[b.end : nxt] = ids[b.end : nxt]  # <|im_end|> and the newline after it
    return labels


def assemble(
    roles: tuple[str, ...] | list[str],
    content_ids: list[list[int]],
    framing: Framing,
    policy: Policy = "assistant",
    learn: list[bool] | None = None,
) -> tuple[list[int], list[int]]:
    """Render already-encoded messages into (input_ids, labels) under `policy`.

    Args:
        roles: role of each message ("system", "user", "assistant").
        content_ids: ordinary-text ids of each message's content.
        framing: ChatML ids of the tokenizer.
        policy: label policy (see module docstring).
        learn: per assistant message, False leaves it unlearned (`weight: 0`); default all True.

    Returns:
        input_ids and labels of equal length; unlearned labels are IGNORE_INDEX.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown label policy {policy!r}; use one of {', '.join(POLICIES)}")
    input_ids = [
        t
        for role, content in zip(roles, content_ids, strict=True)
        for t in (*framing.head(role), *content, *framing.tail())
    ]
    flags = learn if learn is not None else [True] * list(roles).count("assistant")
    return input_ids, labels_of(input_ids, chatml_blocks(list(roles), content_ids, framing), flags, policy)
