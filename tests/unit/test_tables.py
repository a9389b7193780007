"""Local Parquet, Arrow, CSV and save_to_disk data give the same conversations as the JSON lines."""

from __future__ import annotations

import csv
import json

import pytest

from qwen_ft.data.conversations import ReadReport, read_conversations
from qwen_ft.errors import DataError
from tests.conftest import conv

ROWS = [conv("Capital of Peru?", "Lima.", system="Be brief."), conv("1+1?", "2", "and 2+2?", "4")]


def read(path) -> list[dict]:
    return [c.conv for c in read_conversations([str(path)], None, "error", ReadReport())]


def test_parquet_arrow_csv_and_saved_dataset_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    expected = read(jsonl)
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["messages"])
        w.writeheader()
        w.writerows({"messages": json.dumps(r["messages"])} for r in ROWS)
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.parquet", "d.arrow", "d.csv", "saved"):
        assert read(tmp_path / name) == expected, name


def test_a_dataset_dict_directory_names_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds several splits \(train, test\); name one"):
        read(tmp_path / "dd")


def test_csv_bad_json_cell_is_a_row_error_with_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('messages\n"[{""role"": ""user""}"\n')
    report = ReadReport()
    assert list(read_conversations([str(path)], None, "skip", report)) == []
    assert report.skipped == 1 and report.errors[0].startswith(f"{path}:2: a JSON column is malformed")


def test_null_fields_of_a_table_are_missing_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "w", "arguments": {"city": "Lima"}}}],
                },
                {"role": "tool", "content": "19 C"},
                {"role": "assistant", "content": "19 °C"},
            ]
        },
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 1}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    got = read(tmp_path / "d.parquet")
    assert got[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Lima"}
    assert "tool_calls" not in got[0]["messages"][0] and got[1]["learn"] == [True]


def test_a_saved_dataset_directory_tokenizes_and_caches(tmp_path, qwen3_dir, qwen3_tok):
    from datasets import Dataset

    from qwen_ft.data.tokenize import TokenizeSpec, tokenized_dataset

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    spec = TokenizeSpec(64, "truncate", "assistant", "", "error")
    ds, stats = tokenized_dataset([str(tmp_path / "saved")], qwen3_tok, spec, str(tmp_path / "c"))
    assert stats.conversations == 2 and stats.cache == "built"
    assert tokenized_dataset([str(tmp_path / "saved")], qwen3_tok, spec, str(tmp_path / "c"))[1].cache == "hit"
