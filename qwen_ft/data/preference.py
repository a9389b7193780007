"""Preference rows -> a prompt and two completions, checked like SFT rows and rendered with the checkpoint's
own chat template.

TRL's conversational formats (and their plain-text form, a string prompt being one user turn and a string
completion one assistant reply):

    {"prompt": [...messages], "chosen": [...messages], "rejected": [...messages]}   explicit prompt
    {"chosen": [...full conversation], "rejected": [...full conversation]}          implicit prompt

With an implicit prompt the longest common prefix of the two conversations is the prompt. `system`,
`tools` and `chat_template_kwargs` are read as in SFT rows.

Rendering: the prompt is rendered with the generation prompt (`add_generation_prompt=True`), each full
conversation as training renders it; the completion is what the full rendering adds after the prompt,
and only it is learned (TRL's rule). Where the prompt's text is a prefix but its ids are not (tokens
merge across the boundary: Qwen3.5's generation prompt ends "<think>" + "\n", its replies "\n\n"), the
completion is the added text tokenized on its own, so training sees the served prompt's ids followed
by tokens a model generates after them (TRL instead drops the prompt's unmatched end, with a warning).
A template that renders the prompt's text differently inside the full conversation (re-rendering
earlier turns) would train on a context the model never sees when it serves: such a row is refused,
naming what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen_ft.data.chatml import IGNORE_INDEX
from qwen_ft.data.conversations import row_value
from qwen_ft.data.formats import normalise
from qwen_ft.data.schema import RawRow, RowError

PAIR_FIELDS = {"prompt", "chosen", "rejected", "system", "tools", "chat_template_kwargs"}


@dataclass(frozen=True)
class Pair:
    """A validated preference row: the prompt conversation and the two full conversations (formats.py's form)."""

    prompt: dict[str, Any]
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    source: str
    ignored: tuple[str, ...] = ()


def pair_of(row: Any, where: str, default_system: str | None) -> Pair:
    """One preference row, validated and normalised.

    Raises:
        RowError: naming the field and the fix.
    """
    if not isinstance(row, dict):
        raise RowError(f"row is a {type(row).__name__}, expected an object with 'chosen' and 'rejected'", "format")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise RowError(
            f"a preference row needs 'chosen' and 'rejected' (and optionally 'prompt'); {' and '.join(missing)} "
            f"missing (keys present: {', '.join(sorted(map(str, row))) or 'none'})",
            "format",
        )
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    prompt = _messages(row["prompt"], "prompt") if row.get("prompt") is not None else None
    if prompt is None:
        prompt, chosen, rejected = _split_prompt(chosen, rejected)
    if chosen == rejected:
        raise RowError("chosen and rejected are the same, so the pair teaches nothing; fix or remove the row", "pair")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[0].get("role") != "assistant":
            raise RowError(
                f"{name}: the completion must start with an assistant message, got {side[:1]!r:.80}", "pair"
            )
    if row.get("system") and not (prompt and prompt[0].get("role") == "system"):
        prompt = [{"role": "system", "content": row["system"]}, *prompt]
    extra = {k: row[k] for k in ("tools", "chat_template_kwargs") if k in row}
    full_chosen, _ = normalise({"messages": prompt + chosen, **extra}, default_system)
    full_rejected, _ = normalise({"messages": prompt + rejected, **extra}, default_system)
    inserted = len(full_chosen["messages"]) - len(prompt) - len(chosen)  # the default system prompt, if added
    k = len(prompt) + inserted
    head = {**full_chosen, "messages": full_chosen["messages"][:k]}
    head["learn"] = [False] * sum(m["role"] == "assistant" for m in head["messages"])
    leftover = tuple(sorted(str(f) for f in row if f not in PAIR_FIELDS and f != "id"))
    return Pair(head, full_chosen, full_rejected, where, leftover)


def _messages(value: Any, field: str) -> list[dict]:
    """A side of a pair as a list of messages: a string is one user turn (the prompt) or one assistant reply."""
    if isinstance(value, str):
        return [{"role": "user" if field == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError(f"{field}: expected a string or a non-empty list of messages, got {value!r:.60}", "pair")
    return value


def _split_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Implicit prompt: the longest common prefix of the two conversations, and what follows in each."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise RowError(
            "chosen and rejected share no first message, so there is no prompt; give 'prompt' explicitly", "pair"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def render_pair(renderer, pair: Pair) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen completion ids, rejected completion ids) through the checkpoint's template.

    Raises:
        RowError: the template cannot render the row, or renders its prompt differently inside the full
            conversation.
    """
    try:
        prompt = renderer.prompt(pair.prompt)
    except RowError:
        raise
    except Exception as e:  # noqa: BLE001 - a Jinja error (raise_exception) is this row's problem
        raise RowError(f"the chat template ({renderer.source}) cannot render this prompt: {e}", "template") from None
    sides = []
    for name, conv in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ids, _, _ = renderer.render(conv)
        if ids[: len(prompt)] == prompt:
            sides.append(ids[len(prompt) :])
            continue
        completion = renderer.continuation(pair.prompt, conv)  # tokens merged across the prompt's end
        if completion is None:
            at = next(i for i, (a, b) in enumerate(zip(ids, prompt, strict=False)) if a != b) if ids else 0
            raise RowError(
                f"{name}: the chat template ({renderer.source}) renders the prompt differently inside the full "
                f"conversation (from token {at} on: {prompt[at : at + 8]} alone vs {ids[at : at + 8]}), so the "
                "model would learn from a context it never sees when serving; end the prompt at a user turn, or "
                "use a template that renders earlier turns the same way",
                "template",
            )
        sides.append(completion)
    return prompt, sides[0], sides[1]


def pair_rows(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, overlong: str
) -> tuple[list[list[int]], str]:
    """[chosen ids, chosen labels, rejected ids, rejected labels] of a rendered pair under the length policy,
    and its status: each sequence (prompt + completion) fits max_length, or its completion is cut there
    (`truncate`, TRL's keep_start) or the pair is dropped (`drop`); a prompt that leaves no room for a
    completion token is always dropped."""
    if len(prompt) >= max_length:
        return [[], [], [], []], "dropped"
    too_long = len(prompt) + max(len(chosen), len(rejected)) > max_length
    if too_long and overlong == "drop":
        return [[], [], [], []], "dropped"
    room = max_length - len(prompt)
    out = []
    for completion in (chosen, rejected):
        kept = completion[:room]
        out += [prompt + kept, [IGNORE_INDEX] * len(prompt) + kept]
    return out, "truncated" if too_long else "ok"


PAIR_COLUMNS = (
    "input_ids",
    "labels",
    "rejected_ids",
    "rejected_labels",
    "n_supervised",
    "status",
    "error",
    "kind",
    "ignored",
)


def tokenize_pairs(batch: dict, renderer, spec) -> dict:
    """Stage 2 of tokenization (data/tokenize.py) for preference rows: each row's pair rendered, length-checked
    and laid out as the chosen and the rejected sequence (PAIR_COLUMNS); a bad row keeps its place as an error."""
    out: dict[str, list] = {name: [] for name in PAIR_COLUMNS}
    rows = zip(batch["row"], batch["source"], batch["read_error"], batch["read_kind"], strict=True)
    for text, where, error, kind in rows:
        for name, value in zip(PAIR_COLUMNS, _pair_row(text, where, (error, kind), renderer.get(), spec), strict=True):
            out[name].append(value)
    return out


def _pair_row(text: str | None, where: str, read: tuple[str | None, str | None], renderer, spec) -> tuple:
    try:
        if read[0]:
            raise RowError(read[0], read[1] or "json")
        pair = pair_of(row_value(RawRow(where, text=text)), where, spec.default_system)
        sides, status = pair_rows(*render_pair(renderer, pair), spec.max_length, spec.overlong)
    except RowError as e:
        return [], [], [], [], 0, "error", str(e), e.kind, []
    learned = sum(t != IGNORE_INDEX for labels in (sides[1], sides[3]) for t in labels)
    return (*sides, learned, status, "", "", list(pair.ignored))
