"""Streaming readers: .json lists element by element, .jsonl line by line."""

from __future__ import annotations

import json

import pytest

from qwen_ft.data import sources
from qwen_ft.errors import DataError


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(sources, "CHUNK", 5)  # forces elements, strings and UTF-8 chars across chunk edges


def test_json_list_streams_equal_json_load(tmp_path, tiny_chunks):
    rows = [{"id": i, "conversations": [{"from": "user", "value": "héllo 你好 " * i}]} for i in range(30)]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    got = list(sources.iter_rows(p))
    assert [r.value for r in got] == rows
    assert got[1].where == f"{p}[1] (line {json.dumps(rows, indent=2).splitlines().index('  {', 2) + 1})"


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"a": 1}', "expected a JSON list"),
        ('[{"a": 1}, {"b": tru}]', "malformed JSON in element 1"),
        ('[{"a": 1} {"b": 2}]', "expected ',' or ']' after element 0"),
        ('[{"a": 1},', "the JSON list is not closed"),
    ],
)
def test_json_list_structure_errors(tmp_path, tiny_chunks, text, message):
    p = tmp_path / "d.json"
    p.write_text(text)
    with pytest.raises(DataError, match=message):
        list(sources.iter_rows(p))


def test_json_list_bad_utf8(tmp_path, tiny_chunks):
    p = tmp_path / "d.json"
    p.write_bytes(b'[{"a": "ok"}, {"a": "\xc3\x28"}]')
    with pytest.raises(DataError, match="not valid UTF-8 at byte 21"):
        list(sources.iter_rows(p))


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [(r.where, r.value) for r in sources.iter_rows(p)] == [(f"{p}:1", {"a": 1}), (f"{p}:3", {"a": 2})]
