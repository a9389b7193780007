"""Preference rows: TRL's formats parsed into a prompt and two completions (KTO: one, and its label),
rendered through the template (the completion is what the full rendering adds after the prompt), bad rows
refused with their kind."""

from __future__ import annotations

import pytest

from qwen_ft.data.chatml import IGNORE_INDEX
from qwen_ft.data.preference import pair_of, pair_rows, render_pair
from qwen_ft.data.render import Renderer
from qwen_ft.data.schema import RowError

USER = {"role": "user", "content": "What is 2+2?"}
GOOD = {"role": "assistant", "content": "4."}
BAD = {"role": "assistant", "content": "5."}


def test_explicit_implicit_and_string_forms_give_the_same_pair():
    explicit = pair_of({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "f:1", None)
    implicit = pair_of({"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "f:2", None)
    strings = pair_of({"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}, "f:3", None)
    for p in (implicit, strings):
        assert (p.prompt["messages"], p.chosen["messages"], p.rejected["messages"]) == (
            explicit.prompt["messages"],
            explicit.chosen["messages"],
            explicit.rejected["messages"],
        )
    assert explicit.prompt["messages"] == [USER] and explicit.chosen["messages"] == [USER, GOOD]


def test_system_and_default_system_go_before_the_prompt():
    with_system = pair_of({"system": "Be brief.", "prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "f:1", None)
    assert with_system.prompt["messages"][0] == {"role": "system", "content": "Be brief."}
    default = pair_of({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "f:1", "You are helpful.")
    assert [m["role"] for m in default.prompt["messages"]] == ["system", "user"]
    assert default.chosen["messages"][:2] == default.prompt["messages"]


@pytest.mark.parametrize(
    "row, kind, words",
    [
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [GOOD]}, "pair", "chosen and rejected are the same"),
        ({"prompt": [USER], "chosen": [GOOD]}, "format", "rejected missing"),
        ({"prompt": [USER], "chosen": [USER], "rejected": [BAD]}, "pair", "must start with an assistant message"),
        ({"chosen": [GOOD], "rejected": [BAD]}, "pair", "share no first message"),
        ({"prompt": [USER], "chosen": [{"role": "assistant", "content": " "}], "rejected": [BAD]}, "content", "empty"),
        ({"prompt": [USER], "chosen": [], "rejected": [BAD]}, "pair", "non-empty list"),
    ],
)
def test_bad_pairs_are_refused_with_their_kind(row, kind, words):
    with pytest.raises(RowError) as e:
        pair_of(row, "f:1", None)
    assert e.value.kind == kind and words in str(e.value)


def test_the_completion_is_what_the_full_rendering_adds_after_the_prompt(qwen3_tok):
    renderer = Renderer(qwen3_tok, None)  # Qwen v1 ChatML rendering through the Qwen3 vocabulary
    pair = pair_of({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "f:1", "")
    prompt, chosen, rejected = render_pair(renderer, pair)
    full, _, _ = renderer.render(pair.chosen)
    assert prompt + chosen == full and qwen3_tok.decode(chosen) == "4.<|im_end|>\n"
    assert qwen3_tok.decode(rejected) == "5.<|im_end|>\n"


def test_length_policy_cuts_completions_or_drops_the_pair():
    prompt, chosen, rejected = [1, 2, 3], [4, 5, 6, 7], [8, 9]
    rows, status = pair_rows(prompt, chosen, rejected, 8, "truncate")
    assert status == "ok" and rows[0] == prompt + chosen and rows[1] == [IGNORE_INDEX] * 3 + chosen
    rows, status = pair_rows(prompt, chosen, rejected, 5, "truncate")
    assert status == "truncated" and rows[0] == [1, 2, 3, 4, 5] and rows[2] == [1, 2, 3, 8, 9]
    assert pair_rows(prompt, chosen, rejected, 5, "drop")[1] == "dropped"
    assert pair_rows(prompt, chosen, rejected, 3, "truncate")[1] == "dropped"  # no room for any completion


def test_bad_pairs_through_the_pipeline_are_counted_or_refused_with_file_and_line(tmp_path, qwen3_tok):
    import json

    from qwen_ft.data.tokenize import TokenizeSpec, tokenized_dataset
    from qwen_ft.errors import DataError

    good = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    rows = [
        good,
        {"prompt": [USER], "chosen": [GOOD], "rejected": [GOOD]},  # the same completion twice
        {"prompt": [USER], "chosen": [{"role": "assistant", "content": ""}], "rejected": [BAD]},  # empty
        {"prompt": "word " * 80, "chosen": "4.", "rejected": "5."},  # a prompt longer than max_length
        good,
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = TokenizeSpec(48, "truncate", "assistant", "", "skip", None, "{}", "dpo")
    data, stats = tokenized_dataset([str(path)], qwen3_tok, spec, str(tmp_path / "c"))
    assert stats.skipped_kinds == {"pair": [1, f"{path}:2"], "content": [1, f"{path}:3"]}
    assert (stats.rows_read, stats.dropped, stats.dropped_examples, stats.examples) == (5, 1, [f"{path}:4"], 2)
    assert set(data.column_names) >= {"input_ids", "labels", "rejected_ids", "rejected_labels"}
    with pytest.raises(DataError) as e:
        tokenized_dataset(
            [str(path)], qwen3_tok, TokenizeSpec(**{**spec.__dict__, "on_error": "error"}), str(tmp_path)
        )
    assert f"the first: {path}:2: chosen and rejected are the same" in str(e.value)


def test_a_template_that_renders_the_prompt_otherwise_is_refused(tmp_path):
    """Qwen3's template with enable_thinking false closes an empty think block in the generation prompt, while a
    reply carrying reasoning_content renders its own: the prompt is no prefix of the conversation."""
    import shutil

    from qwen_ft.tokenizer import load_tokenizer
    from qwen_ft.tokenizer.bundled import bundled_files
    from tests.conftest import ASSETS

    shutil.copy(bundled_files("qwen3")[0], tmp_path / "tokenizer.json")
    shutil.copy(ASSETS / "chat_templates" / "tokenizer_config.qwen3.json", tmp_path / "tokenizer_config.json")
    renderer = Renderer.of(load_tokenizer(tmp_path))
    thinking = {**GOOD, "reasoning_content": "Two and two make four."}
    row = {
        "prompt": [USER],
        "chosen": [thinking],
        "rejected": [BAD],
        "chat_template_kwargs": {"enable_thinking": False},
    }
    with pytest.raises(RowError) as e:
        render_pair(renderer, pair_of(row, "f:1", None))
    assert e.value.kind == "template" and "chosen: the chat template" in str(e.value)
    prompt, chosen, _ = render_pair(renderer, pair_of({**row, "chat_template_kwargs": {}}, "f:1", None))
    assert "<think>\nTwo and two make four.\n</think>" in renderer.tok.decode(chosen)  # thinking on: a prefix


def test_kto_rows_need_a_boolean_label_and_a_completion(tmp_path, qwen3_tok):
    import json

    from qwen_ft.data.preference import unpaired_of
    from qwen_ft.data.tokenize import TokenizeSpec, tokenized_dataset

    row = unpaired_of({"prompt": [USER], "completion": [GOOD], "label": True}, "f:1", "")
    assert row.desirable and row.full["messages"][-1] == GOOD and row.prompt["messages"] == [USER]
    good = {"prompt": "What is 2 + 2?", "completion": "4.", "label": False}
    rows = [
        good,
        {**good, "label": "yes"},  # not a boolean
        {**good, "label": 1},  # nor is 1
        {"prompt": "What is 2 + 2?", "label": True},  # no completion
        {**good, "completion": [{"role": "assistant", "content": ""}]},  # empty
    ]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = TokenizeSpec(48, "truncate", "assistant", "", "skip", None, "{}", "kto")
    data, stats = tokenized_dataset([str(path)], qwen3_tok, spec, str(tmp_path / "c"))
    assert stats.skipped_kinds == {
        "label": [2, f"{path}:2"],
        "format": [1, f"{path}:4"],
        "content": [1, f"{path}:5"],
    }
    assert stats.examples == 1 and data["status"] == ["ok", "error", "error", "error", "error"]
    assert data["desirable"][0] is False
    assert qwen3_tok.decode([t for t in data["labels"][0] if t != -100]) == "4.<|im_end|>\n"
    with pytest.raises(RowError) as e:
        unpaired_of({**good, "label": "yes"}, "f:2", "")
    assert "label: 'yes' is not a boolean; write true" in str(e.value)
