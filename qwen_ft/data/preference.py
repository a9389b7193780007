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
UNPAIRED_FIELDS = {"prompt", "completion", "label", "system", "tools", "chat_template_kwargs"}


@dataclass(frozen=True)
class Pair:
    """A validated preference row: the prompt conversation and the two full conversations (formats.py's form)."""

    prompt: dict[str, Any]
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    source: str
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class Unpaired:
    """A validated KTO row: the prompt conversation, the full one, and whether its completion is desirable."""

    prompt: dict[str, Any]
    full: dict[str, Any]
    desirable: bool
    source: str
    ignored: tuple[str, ...] = ()


def pair_of(row: Any, where: str, default_system: str | None) -> Pair:
    """One preference row, validated and normalised.

    Raises:
        RowError: naming the field and the fix.
    """
    _require(row, ("chosen", "rejected"), "a preference row needs 'chosen' and 'rejected' (and optionally 'prompt')")
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    prompt = _messages(row["prompt"], "prompt") if row.get("prompt") is not None else None
    if prompt is None:
        prompt, chosen, rejected = _split_prompt(chosen, rejected)
    if chosen == rejected:
        raise RowError("chosen and rejected are the same, so the pair teaches nothing; fix or remove the row", "pair")
    head, (full_chosen, full_rejected) = _conversations(
        row, prompt, {"chosen": chosen, "rejected": rejected}, default_system
    )
    return Pair(head, full_chosen, full_rejected, where, _leftover(row, PAIR_FIELDS))


def unpaired_of(row: Any, where: str, default_system: str | None) -> Unpaired:
    """One KTO row ({"prompt", "completion", "label": bool}), validated and normalised.

    Raises:
        RowError: naming the field and the fix.
    """
    _require(row, ("prompt", "completion", "label"), "a KTO row needs 'prompt', 'completion' and 'label'")
    if not isinstance(row["label"], bool):
        raise RowError(
            f"label: {row['label']!r} is not a boolean; write true (a desirable completion) or false (undesirable)",
            "label",
        )
    prompt, completion = _messages(row["prompt"], "prompt"), _messages(row["completion"], "completion")
    head, (full,) = _conversations(row, prompt, {"completion": completion}, default_system)
    return Unpaired(head, full, row["label"], where, _leftover(row, UNPAIRED_FIELDS))


def _require(row: Any, keys: tuple[str, ...], needs: str) -> None:
    if not isinstance(row, dict):
        raise RowError(f"row is a {type(row).__name__}, expected an object with {', '.join(keys)}", "format")
    missing = [k for k in keys if k not in row]
    if missing:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(f"{needs}; {' and '.join(missing)} missing (keys present: {present})", "format")


def _conversations(
    row: dict, prompt: list[dict], sides: dict[str, list[dict]], default_system: str | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The prompt conversation (nothing learned) and prompt + each side, normalised (formats.py's form)."""
    for name, side in sides.items():
        if not side or side[0].get("role") != "assistant":
            raise RowError(
                f"{name}: the completion must start with an assistant message, got {side[:1]!r:.80}", "pair"
            )
    if row.get("system") and not (prompt and prompt[0].get("role") == "system"):
        prompt = [{"role": "system", "content": row["system"]}, *prompt]
    extra = {k: row[k] for k in ("tools", "chat_template_kwargs") if k in row}
    fulls = [normalise({"messages": prompt + side, **extra}, default_system)[0] for side in sides.values()]
    first = next(iter(sides.values()))
    k = len(fulls[0]["messages"]) - len(first)  # the prompt, with the default system prompt if one was added
    head = {**fulls[0], "messages": fulls[0]["messages"][:k]}
    head["learn"] = [False] * sum(m["role"] == "assistant" for m in head["messages"])
    return head, fulls


def _leftover(row: dict, fields: set[str]) -> tuple[str, ...]:
    return tuple(sorted(str(f) for f in row if f not in fields and f != "id"))


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
    prompt, sides = render_sides(renderer, pair.prompt, {"chosen": pair.chosen, "rejected": pair.rejected})
    return prompt, sides[0], sides[1]


def render_sides(renderer, head: dict, convs: dict[str, dict]) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids (with the generation prompt) and the completion ids of each full conversation."""
    try:
        prompt = renderer.prompt(head)
    except RowError:
        raise
    except Exception as e:  # noqa: BLE001 - a Jinja error (raise_exception) is this row's problem
        raise RowError(f"the chat template ({renderer.source}) cannot render this prompt: {e}", "template") from None
    sides = []
    for name, conv in convs.items():
        ids, _, _ = renderer.render(conv)
        if ids[: len(prompt)] == prompt:
            sides.append(ids[len(prompt) :])
            continue
        completion = renderer.continuation(head, conv)  # tokens merged across the prompt's end
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
    return prompt, sides


def pair_rows(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, overlong: str
) -> tuple[list[list[int]], str]:
    """[chosen ids, chosen labels, rejected ids, rejected labels] of a rendered pair under the length policy,
    and its status (`completion_rows`)."""
    return completion_rows(prompt, [chosen, rejected], max_length, overlong)


def completion_rows(
    prompt: list[int], completions: list[list[int]], max_length: int, overlong: str
) -> tuple[list[list[int]], str]:
    """[ids, labels] of prompt + each completion under the length policy, and their status: each sequence fits
    max_length, or its completion is cut there (`truncate`, TRL's keep_start) or the row is dropped
    (`drop`); a prompt that leaves no room for a completion token is always dropped."""
    if len(prompt) >= max_length:
        return [[] for _ in range(2 * len(completions))], "dropped"
    too_long = len(prompt) + max(map(len, completions)) > max_length
    if too_long and overlong == "drop":
        return [[] for _ in range(2 * len(completions))], "dropped"
    room = max_length - len(prompt)
    out = []
    for completion in completions:
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
    return _tokenize_rows(batch, PAIR_COLUMNS, lambda raw: _pair_row(raw, renderer.get(), spec))


def _tokenize_rows(batch: dict, columns: tuple[str, ...], row_fn) -> dict:
    """A `datasets.map` batch of read rows through `row_fn` (a RawRow -> one value per column)."""
    out: dict[str, list] = {name: [] for name in columns}
    rows = zip(batch["row"], batch["source"], batch["read_error"], batch["read_kind"], strict=True)
    for text, where, error, kind in rows:
        raw = RawRow(where, error=error, kind=kind or "json") if error else RawRow(where, text=text)
        for name, value in zip(columns, row_fn(raw), strict=True):
            out[name].append(value)
    return out


def _pair_row(raw: RawRow, renderer, spec) -> tuple:
    try:
        pair = pair_of(row_value(raw), raw.where, spec.default_system)
        sides, status = pair_rows(*render_pair(renderer, pair), spec.max_length, spec.overlong)
    except RowError as e:
        return [], [], [], [], 0, "error", str(e), e.kind, []
    learned = sum(t != IGNORE_INDEX for labels in (sides[1], sides[3]) for t in labels)
    return (*sides, learned, status, "", "", list(pair.ignored))


UNPAIRED_COLUMNS = ("input_ids", "labels", "desirable", "n_supervised", "status", "error", "kind", "ignored")


def tokenize_unpaired(batch: dict, renderer, spec) -> dict:
    """`tokenize_pairs` for KTO rows: one sequence each, and whether its completion is desirable."""
    return _tokenize_rows(batch, UNPAIRED_COLUMNS, lambda raw: _unpaired_row(raw, renderer.get(), spec))


def _unpaired_row(raw: RawRow, renderer, spec) -> tuple:
    try:
        row = unpaired_of(row_value(raw), raw.where, spec.default_system)
        prompt, (completion,) = render_sides(renderer, row.prompt, {"completion": row.full})
        (ids, labels), status = completion_rows(prompt, [completion], spec.max_length, spec.overlong)
    except RowError as e:
        return [], [], False, 0, "error", str(e), e.kind, []
    learned = sum(t != IGNORE_INDEX for t in labels)
    return ids, labels, row.desirable, learned, status, "", "", list(row.ignored)
