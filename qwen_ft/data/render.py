"""The one way a conversation becomes ids and labels for a tokenizer: through its chat template
(see `template.py` for the label rule), or Qwen v1's ChatML where the tokenizer has no template
(`chatml.py`). Training, preprocess dumps, chat, merge checks and calibration all render here.
"""

from __future__ import annotations

from typing import Any

from qwen_ft.config.schema import DEFAULT_SYSTEM
from qwen_ft.data.chatml import IGNORE_INDEX, Block, Framing, Policy, as_text, assemble, chatml_blocks, labels_of
from qwen_ft.data.schema import RowError
from qwen_ft.data.template import ChatTemplate, TemplateRenderer, find_template, special_token_variables
from qwen_ft.errors import QwenFtError


class Renderer:
    """Renders normalised conversations (`formats.normalise`) for one tokenizer."""

    def __init__(self, tok, template: ChatTemplate | None, kwargs: dict | None = None):
        self.tok, self.template = tok, template
        self.kwargs = dict(kwargs or {})
        variables = {**special_token_variables(tok.directory), **self.kwargs} if template else {}
        self._templ = (
            None
            if template is None
            else TemplateRenderer(template, tok.special_tokens(), tok.encode_offsets, variables)
        )
        self._tools_templ = (
            self._templ
            if template is None or template.tool_use is None
            else TemplateRenderer(template.tool_use, tok.special_tokens(), tok.encode_offsets, variables)
        )

    def _for(self, conv: dict[str, Any]) -> TemplateRenderer:
        """The template that renders `conv`: as apply_chat_template, the "tool_use" one when the row has tools."""
        assert self._templ is not None and self._tools_templ is not None
        return self._tools_templ if conv.get("tools") is not None else self._templ

    @classmethod
    def of(cls, tok, override: str | None = None, kwargs: dict | None = None) -> Renderer:
        """The tokenizer directory's own template (or `override`); Qwen v1 ChatML when there is none."""
        if override and not tok.supports_templates:
            raise QwenFtError(
                f"data.chat_template {override}: a Qwen v1 qwen.tiktoken vocabulary renders Qwen v1 "
                "ChatML only; convert the checkpoint (qwen-ft convert), whose tokenizer.json takes "
                "templates, or remove data.chat_template"
            )
        template = find_template(tok.directory, override) if tok.supports_templates else None
        return cls(tok, template, kwargs)

    @property
    def source(self) -> str:
        """Where the rendering comes from, for reports."""
        return self.template.source if self.template else "Qwen v1 ChatML (the tokenizer has no chat template)"

    def render(self, conv: dict[str, Any], policy: Policy = "assistant") -> tuple[list[int], list[int], list[Block]]:
        """(input_ids, labels, blocks) of a whole conversation.

        Raises:
            RowError: what the template cannot render for this row.
        """
        (result,) = self.render_many([conv], policy)
        if isinstance(result, RowError):
            raise result
        return result

    def render_many(
        self, convs: list[dict[str, Any]], policy: Policy = "assistant"
    ) -> list[tuple[list[int], list[int], list[Block]] | RowError]:
        """`render` over many conversations, with one batched encoding call for all their text (the
        tokenizer's Rust batch path); a row that fails gives its RowError in its place."""
        if self._templ is None:
            return [self._caught(c, policy) for c in convs]
        segments: list[list[str | int] | RowError] = []
        for conv in convs:
            try:
                segments.append(self._for(conv).segments(conv))
            except Exception as e:  # noqa: BLE001 - a Jinja error (raise_exception, undefined) is this row's problem
                segments.append(
                    RowError(
                        str(e)
                        if isinstance(e, ValueError)
                        else f"the chat template ({self.source}) cannot render this row: {e}",
                        "template",
                    )
                )
        texts = [s for segs in segments if not isinstance(segs, RowError) for s in segs if isinstance(s, str)]
        encoded = iter(self.tok.encode_offsets(texts))
        return [
            segs if isinstance(segs, RowError) else self._labelled(conv, policy, segs, encoded)
            for conv, segs in zip(convs, segments, strict=True)
        ]

    def _labelled(self, conv, policy, segments, encoded):
        try:
            ids, blocks = self._for(conv).assemble(segments, encoded)
            return ids, labels_of(ids, blocks, conv["learn"], policy), blocks
        except RowError as e:
            return e
        except ValueError as e:
            return RowError(str(e), "template")

    def _caught(self, conv, policy):
        try:
            return self._chatml(conv, policy)
        except RowError as e:
            return e

    def prompt(self, conv: dict[str, Any]) -> list[int]:
        """Ids that ask the model for the next assistant turn (the generation prompt)."""
        if self._templ is None:
            ids, _, _ = self._chatml({**conv, "learn": [False] * len(conv.get("learn", []))}, "assistant")
            framing = Framing.of(self.tok)
            return ids + framing.head("assistant")
        return self._for(conv).encode(conv, add_generation_prompt=True)[0]

    def continuation(self, prompt: dict[str, Any], full: dict[str, Any]) -> list[int] | None:
        """Ids of the text `full`'s rendering adds after `prompt`'s generation prompt, tokenized on their own
        (the tokens a model served that prompt generates, where the whole text would merge tokens across the
        boundary: Qwen3.5's "<think>" + "\n" prompt against "\n\n" inside the reply); None when the prompt's
        text is no prefix of the conversation's."""
        if self._templ is None:
            return None
        head, whole = self._for(prompt).segments(prompt, True), self._for(full).segments(full)
        k = len(head) - 1
        if k < 0 or k >= len(whole) or whole[:k] != head[:k] or not _extends(whole[k], head[k]):
            return None
        rest, last, ours = whole[k + 1 :], head[k], whole[k]
        if isinstance(last, str) and isinstance(ours, str) and len(ours) > len(last):
            rest = [ours[len(last) :], *rest]
        encoded = iter(self.tok.encode_offsets([seg for seg in rest if isinstance(seg, str)]))
        return [t for seg in rest for t in ([seg] if isinstance(seg, int) else next(encoded)[0])]

    def _chatml(self, conv: dict[str, Any], policy: Policy) -> tuple[list[int], list[int], list[Block]]:
        """Qwen v1 ChatML: text roles only (text parts joined with newlines); the QwenLM default system
        prompt when there is none."""
        messages = conv["messages"]
        for i, m in enumerate(messages):
            if m["role"] == "tool" or m.get("tool_calls") or m.get("reasoning_content") or conv.get("tools"):
                raise RowError(
                    f"messages[{i}]: tools and reasoning need a chat template, and this Qwen v1 "
                    "tokenizer has none; train on the converted checkpoint (qwen-ft convert) with a "
                    "data.chat_template that renders them",
                    "template",
                )
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
        roles = [m["role"] for m in messages]
        framing = Framing.of(self.tok)
        contents = [self.tok.encode(as_text(m["content"])) for m in messages]  # ChatML takes strings
        ids, labels = assemble(roles, contents, framing, policy, learn=conv["learn"])
        return ids, labels, chatml_blocks(roles, contents, framing)


def _extends(segment: str | int, start: str | int) -> bool:
    """A rendered segment that begins with the prompt's last one (the same control token, or longer text)."""
    if isinstance(start, int) or isinstance(segment, int):
        return segment == start
    return segment.startswith(start)


def fit_to_length(
    renderer: Renderer,
    conv: dict[str, Any],
    rendered: tuple[list[int], list[int], list[Block]],
    policy: Policy,
    max_length: int,
    overlong: str,
) -> tuple[list[int], list[int], str]:
    """An overlong conversation cut after its last assistant message that fits, or dropped.

    The cut conversation is rendered again, not sliced: the template renders a conversation that
    ends at a reply differently (Qwen3 keeps that reply's thinking), and `last_turn` learns the
    last kept reply. A cut that leaves nothing learned is dropped.

    Returns:
        (ids, labels, status) with status "ok", "truncated" or "dropped" (empty lists).
    """
    ids, labels, blocks = rendered
    if len(ids) <= max_length:
        return ids, labels, "ok"
    if overlong == "drop":
        return [], [], "dropped"
    replies = [i for i, m in enumerate(conv["messages"]) if m["role"] == "assistant"]
    # start near the cut the whole rendering suggests (a cut renders about as long as that prefix)
    ends = [b.end + 2 for b in blocks if b.role == "assistant"]
    guess = sum(1 for e in ends if e <= max_length)
    for k in range(min(guess + 1, len(replies) - 1), 0, -1):
        cut = {**conv, "messages": conv["messages"][: replies[k - 1] + 1], "learn": conv["learn"][:k]}
        try:
            ids, labels, _ = renderer.render(cut, policy)
        except RowError:
            continue
        if len(ids) <= max_length and any(x != IGNORE_INDEX for x in labels):
            return ids, labels, "truncated"
    return [], [], "dropped"
