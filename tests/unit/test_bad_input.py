"""Every kind of bad row: a clear file:line + field error, or skipped and counted. Never a traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qwen_ft.cli.main import main
from qwen_ft.data.conversations import ReadReport, read_conversations
from qwen_ft.data.formats import parse_row
from qwen_ft.data.schema import RowError
from qwen_ft.errors import DataError
from tests.conftest import ASSETS, conv, write_jsonl

GOOD = conv("hi", "hello")
# One bad row per file in tests/assets/bad_rows/ (raw bytes, non-UTF-8 included), with the error it must give.
MESSAGES = {
    "malformed_json": "malformed JSON at column",
    "unknown_role": "messages[0].role: unknown role 'bot'; use one of system, user, assistant",
    "empty_content": "messages[1].content: empty assistant message",
    "non_string_content": "messages[0].content[0]: a str part; qwen-ft trains text models",
    "no_assistant": "has no assistant reply",
    "non_utf8": "not valid UTF-8 (byte 0xff at column 15)",
    "not_an_object": "row is a list, expected an object",
    "no_messages_key": "cannot tell the format: keys present: text (one of 'messages' (OpenAI)",
    "image_part": "messages[0].content[1]: an image part (photos/cat.png); qwen-ft trains the language model of "
    "vision-language checkpoints (Qwen3.5/3.6) on text only, so images, video and audio cannot be "
    "learned from. Remove the media part (or the row), or set data.on_error=skip",
    "bad_tool_call": "messages[1].tool_calls[0].arguments: not valid JSON",
    "bad_weight": "weight 0.5 / loss True: use weight 0 or 1",
    "lone_surrogate": "text holds a lone surrogate U+D800",
}
# The kind (schema.KINDS) each bad row is counted under.
KIND = {
    "malformed_json": "json",
    "unknown_role": "message",
    "empty_content": "content",
    "non_string_content": "content",
    "no_assistant": "no_reply",
    "non_utf8": "encoding",
    "not_an_object": "format",
    "no_messages_key": "format",
    "image_part": "media",
    "bad_tool_call": "tools",
    "bad_weight": "field",
    "lone_surrogate": "encoding",
}
CASES = {
    case: ((ASSETS / "bad_rows" / f"{case}.jsonl").read_bytes().rstrip(b"\n"), message)
    for case, message in MESSAGES.items()
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_row_error_names_file_line_field(tmp_path, case):
    raw, message = CASES[case]
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, GOOD], raw_lines={1: raw})
    with pytest.raises(DataError) as e:
        list(read_conversations([str(path)], "sys", "error", ReadReport()))
    text = str(e.value)
    assert f"{path}:2: " in text and message in text, text
    assert "1 bad row(s) of 3" in text and "data.on_error=skip" in text


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_row_skipped_and_counted(tmp_path, case):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, GOOD], raw_lines={1: CASES[case][0]})
    report = ReadReport()
    convs = list(read_conversations([str(path)], "sys", "skip", report))
    assert len(convs) == 2 and report.rows == 3 and report.skipped == 1
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:3"]


def test_every_bad_row_asset_has_its_message():
    assert sorted(p.stem for p in (ASSETS / "bad_rows").glob("*.jsonl")) == sorted(MESSAGES) == sorted(KIND)
    assert all(raw and b"\n" not in raw for raw, _ in CASES.values())  # one row each


def test_media_rows_skipped_and_counted_by_the_training_pipeline(tmp_path, qwen3_tok):
    """Where rows are normalised in the tokenizing workers (training, preprocess): media rows are refused
    together with file:line, or skipped and counted in the data stats with data.on_error=skip."""
    from qwen_ft.data.tokenize import TokenizeSpec, tokenized_dataset

    video = {
        "messages": [
            {"role": "user", "content": [{"video": "clips/a.mp4"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "A dog."},
        ]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, video, GOOD], raw_lines={1: CASES["image_part"][0]})
    spec = TokenizeSpec(
        max_length=64, overlong="truncate", label_policy="assistant", default_system="", on_error="skip"
    )
    data, stats = tokenized_dataset([str(path)], qwen3_tok, spec, str(tmp_path / "c"))
    assert (stats.rows_read, stats.skipped, stats.conversations, stats.examples) == (4, 2, 2, 2)
    assert stats.skipped_examples[0].startswith(f"{path}:2: messages[0].content[1]: an image part (photos/cat.png)")
    assert stats.skipped_examples[1].startswith(f"{path}:3: messages[0].content[0]: a video part (clips/a.mp4)")
    assert data["source"][:1] == [f"{path}:1"] and f"{path}:4" in data["source"]
    with pytest.raises(DataError) as e:
        tokenized_dataset(
            [str(path)], qwen3_tok, TokenizeSpec(**{**spec.__dict__, "on_error": "error"}), str(tmp_path / "c2")
        )
    assert "2 bad row(s) of 4" in str(e.value) and f"{path}:2: " in str(e.value) and f"{path}:3: " in str(e.value)


def test_training_pipeline_counts_bad_rows_by_kind_with_the_first_of_each(tmp_path, qwen3_tok, qwen3_dir):
    """Every kind of bad row, twice, through the tokenizing workers: counted by kind with its first line under
    on_error=skip; under on_error=error, refused naming the first broken row."""
    import qwen_ft.tokenizer
    from qwen_ft.data.schema import KINDS
    from qwen_ft.data.template import find_template
    from qwen_ft.data.tokenize import TokenizeSpec, tokenized_dataset

    qwen35 = find_template(qwen3_dir, str(Path(qwen_ft.tokenizer.__file__).parent / "templates" / "qwen35.jinja"))
    no_user = {"messages": [{"role": "assistant", "content": "x"}]}  # the Qwen3.5 template raises on it
    bad = {**{case: raw for case, (raw, _) in CASES.items()}, "no_user": json.dumps(no_user).encode()}
    kind = {**KIND, "no_user": "template"}
    lines = {2 * i + 1: raw for i, raw in enumerate(list(bad.values()) * 2)}  # bad rows at even line numbers
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * (2 * len(lines) + 1), raw_lines=lines)
    spec = TokenizeSpec(64, "truncate", "assistant", "", "skip", qwen35)
    _, stats = tokenized_dataset([str(path)], qwen3_tok, spec, str(tmp_path / "c"))
    first = {}
    for line, case in zip(sorted(lines), list(bad) * 2, strict=True):
        first.setdefault(kind[case], f"{path}:{line + 1}")
    counts = {k: 2 * sum(v == k for v in kind.values()) for k in first}
    assert stats.skipped_kinds == {k: [counts[k], first[k]] for k in first}
    assert set(stats.skipped_kinds) == set(KINDS) - {"pair", "label"}  # every kind a conversation row has
    assert (stats.rows_read, stats.skipped, stats.examples) == (4 * len(bad) + 1, 2 * len(bad), 2 * len(bad) + 1)
    with pytest.raises(DataError) as e:
        tokenized_dataset(
            [str(path)], qwen3_tok, TokenizeSpec(**{**spec.__dict__, "on_error": "error"}), str(tmp_path)
        )
    assert f"the first: {path}:2: {MESSAGES['malformed_json']}" in str(e.value)


def test_all_bad_rows_listed_together(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 4, raw_lines={0: b"{", 2: b"[]"})
    with pytest.raises(DataError) as e:
        list(read_conversations([str(path)], "", "error", ReadReport()))
    assert f"{path}:1:" in str(e.value) and f"{path}:3:" in str(e.value)


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list(read_conversations([str(tmp_path / "nope.jsonl")], "", "skip", ReadReport()))
    (tmp_path / "d.txt").write_text("a,b")
    with pytest.raises(DataError, match="unsupported extension '.txt'; use one of .jsonl, .json, .parquet"):
        list(read_conversations([str(tmp_path / "d.txt")], "", "skip", ReadReport()))
    with pytest.raises(DataError, match="looks like a dataset name on a hub, and qwen-ft works offline"):
        list(read_conversations(["Qwen/some-dataset"], "", "skip", ReadReport()))


def roles_contents(c) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(m["role"] for m in c.messages), tuple(m["content"] for m in c.messages)


def test_system_message_honoured_and_default_inserted():
    c = parse_row(conv("hi", "yo", system="Be terse."), "f:1", "DEFAULT")
    assert roles_contents(c) == (("system", "user", "assistant"), ("Be terse.", "hi", "yo"))
    c = parse_row({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "f:1", "D")
    assert roles_contents(c) == (("system", "user", "assistant"), ("D", "hi", "yo"))
    assert roles_contents(parse_row(conv("hi", "yo"), "f:1", ""))[0] == ("user", "assistant")  # the template's own
    with pytest.raises(RowError):
        parse_row({"messages": []}, "f:1", "")


def test_cli_reports_bad_data_without_traceback(tmp_path, qwen3_dir, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD], raw_lines={1: b'{"messages": [{"role": "bot"}]}'})
    args = ["preprocess", "--tokenizer", str(qwen3_dir), "--data", str(path), "data.cache_dir=" + str(tmp_path / "c")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: messages[0].role: unknown role 'bot'" in err and "Traceback" not in err
    assert main([*args, "--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"skipped \(bad rows\)\s+1\n", out) and f"skipped: {path}:2: messages[0].role" in out
