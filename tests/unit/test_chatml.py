"""ChatML rendering and label masks: exact ids with the real Qwen vocabulary."""

from __future__ import annotations

import pytest

from qwen_ft.data.chatml import IGNORE_INDEX
from qwen_ft.data.render import Renderer, fit_to_length
from tests.conftest import chatml_render as render_chatml

X = IGNORE_INDEX
S, E, NL = 151644, 151645, 198  # <|im_start|>, <|im_end|>, "\n"
SYSTEM, USER, ASSISTANT = 8948, 872, 77091  # "system", "user", "assistant"
CONV = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "1+1?"), ("assistant", "2")]
# Content ids: "Be brief." = 3430 9814 13; "Hi" = 13048; "Hello!" = 9707 0; "1+1?" = 16 10 16 30; "2" = 17
IDS = (
    [S, SYSTEM, NL, 3430, 9814, 13, E, NL]
    + [S, USER, NL, 13048, E, NL]
    + [S, ASSISTANT, NL, 9707, 0, E, NL]
    + [S, USER, NL, 16, 10, 16, 30, E, NL]
    + [S, ASSISTANT, NL, 17, E, NL]
)


def test_exact_ids_both_vocabularies(any_tok):
    ids, _ = render_chatml(CONV, any_tok)
    assert ids == IDS


def test_assistant_policy_exact_labels(any_tok):
    _, labels = render_chatml(CONV, any_tok, "assistant")
    expected = [X] * 8 + [X] * 6 + [X, X, X, 9707, 0, E, X] + [X] * 9 + [X, X, X, 17, E, X]
    assert labels == expected
    assert [t for t in labels if t != X] == [9707, 0, E, 17, E]


def test_last_turn_policy(any_tok):
    _, labels = render_chatml(CONV, any_tok, "last_turn")
    assert [t for t in labels if t != X] == [17, E]
    assert labels[-4:] == [X, 17, E, X]


def test_qwen_reference_policy_exact_labels(any_tok):
    _, labels = render_chatml(CONV, any_tok, "qwen_reference")
    expected = (
        [S, X, X, X, X, X, E, NL]
        + [S, X, X, X, E, NL]
        + [S, X, X, 9707, 0, E, NL]
        + [S, X, X, X, X, X, X, E, NL]
        + [S, X, X, 17, E, NL]
    )
    assert labels == expected


def qwenlm_preprocess(source: list[dict], tok, system_message: str) -> tuple[list[int], list[int]]:
    """QwenLM finetune.py `preprocess` for one conversation, without its padding (a faithful copy)."""
    im_start, im_end = tok.im_start_id, tok.im_end_id
    nl_tokens = tok.encode("\n")

    def tokenizer(text):  # Qwen's tokenizer call: "<|im_start|>" in role strings is the control token
        return (
            [im_start] + tok.encode(text[len("<|im_start|>") :])
            if text.startswith("<|im_start|>")
            else tok.encode(text)
        )

    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    _system = tokenizer("system") + nl_tokens
    input_id, target = [], []
    system = [im_start] + _system + tokenizer(system_message) + [im_end] + nl_tokens
    input_id += system
    target += [im_start] + [X] * (len(system) - 3) + [im_end] + nl_tokens
    for sentence in source:
        role = roles[sentence["from"]]
        _input_id = tokenizer(role) + nl_tokens + tokenizer(sentence["value"]) + [im_end] + nl_tokens
        input_id += _input_id
        if role == "<|im_start|>user":
            _target = [im_start] + [X] * (len(_input_id) - 3) + [im_end] + nl_tokens
        else:
            _target = (
                [im_start]
                + [X] * len(tokenizer(role))
                + _input_id[len(tokenizer(role)) + 1 : -2]
                + [im_end]
                + nl_tokens
            )
        target += _target
    return input_id, target


@pytest.mark.parametrize(
    "turns",
    [
        [("user", "What is 2+2?"), ("assistant", "4")],
        [
            ("user", "你好"),
            ("assistant", "你好！很高兴见到你。"),
            ("user", "code?"),
            ("assistant", "def f():\n    pass\n"),
        ],
    ],
)
def test_qwen_reference_matches_qwenlm_token_for_token(v1_tok, turns):
    source = [{"from": r, "value": c} for r, c in turns]
    ref_ids, ref_labels = qwenlm_preprocess(source, v1_tok, "You are a helpful assistant.")
    ids, labels = render_chatml([("system", "You are a helpful assistant."), *turns], v1_tok, "qwen_reference")
    assert ids == ref_ids and labels == ref_labels


def test_content_is_encoded_on_its_own(any_tok):
    # "\n" at the start of content must not merge with the header newline.
    ids, _ = render_chatml([("system", "s"), ("user", "\nx"), ("assistant", "y")], any_tok)
    user = ids.index(S, 1)
    assert ids[user : user + 3] == [S, USER, NL] and ids[user + 3 : user + 5] == any_tok.encode("\nx")


def test_special_text_in_content_is_not_a_control_token(any_tok):
    turns = [("system", "s"), ("user", "say <|im_end|>"), ("assistant", "<|im_end|><|im_start|>")]
    ids, labels = render_chatml(turns, any_tok)
    assert ids.count(E) == 3 and ids.count(S) == 3  # only the framing
    assert [t for t in labels if t != X][-1] == E


def test_overlong_truncates_at_turn_boundary(v1_tok):
    renderer = Renderer(v1_tok, None)
    conv = {"messages": [{"role": r, "content": c} for r, c in CONV], "learn": [True, True]}
    rendered = renderer.render(conv)
    full = len(rendered[0])
    assert fit_to_length(renderer, conv, rendered, "assistant", full, "truncate")[2] == "ok"
    ids, labels, status = fit_to_length(renderer, conv, rendered, "assistant", full - 1, "truncate")
    assert status == "truncated" and (ids, labels) == render_chatml(CONV[:3], v1_tok)
    assert ids[-2:] == [E, NL] and labels[-2:] == [E, X]  # the kept reply keeps its <|im_end|>
    assert fit_to_length(renderer, conv, rendered, "assistant", full - 1, "drop")[2] == "dropped"
    assert fit_to_length(renderer, conv, rendered, "assistant", 20, "truncate")[2] == "dropped"  # no reply fits


def test_unknown_policy_is_refused(v1_tok):
    with pytest.raises(ValueError, match="unknown label policy"):
        render_chatml(CONV, v1_tok, "everything")
