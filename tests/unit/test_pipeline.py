"""Tokenization through datasets: cache hits, cache keys, multi-process equality, --dump, stats."""

from __future__ import annotations

import json
import os

import pytest

from qwen_ft.cli.main import main
from qwen_ft.config.load import config_from_dict
from qwen_ft.data.formats import normalise
from qwen_ft.data.prepare import prepare_data
from qwen_ft.data.render import Renderer
from qwen_ft.data.tokenize import TokenizeSpec, tokenized_dataset
from tests.conftest import chatml_render, conv, write_jsonl

SPEC = TokenizeSpec(
    max_length=64,
    overlong="truncate",
    label_policy="assistant",
    default_system="You are a helpful assistant.",
    on_error="error",
)


def sample_rows(n):
    return [conv(f"question {i}?", f"answer {i}.", f"more {i}", "ok " * (6 * (i % 7) + 1)) for i in range(n)]


def test_cache_hit_and_key_changes(tmp_path, qwen3_tok):
    f = write_jsonl(tmp_path / "d.jsonl", sample_rows(20))
    cache = str(tmp_path / "cache")
    ds1, s1 = tokenized_dataset([str(f)], qwen3_tok, SPEC, cache)
    ds2, s2 = tokenized_dataset([str(f)], qwen3_tok, SPEC, cache)
    assert (s1.cache, s2.cache) == ("built", "hit") and s1.cache_path == s2.cache_path
    assert ds1["input_ids"] == ds2["input_ids"]
    _, s3 = tokenized_dataset([str(f)], qwen3_tok, TokenizeSpec(**{**SPEC.__dict__, "max_length": 32}), cache)
    write_jsonl(f, sample_rows(21))
    _, s4 = tokenized_dataset([str(f)], qwen3_tok, SPEC, cache)
    assert len({s1.cache_path, s3.cache_path, s4.cache_path}) == 3
    assert s4.cache == "built" and s4.conversations == 21


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_a_damaged_cache_is_found_by_its_digests_and_built_again(tmp_path, qwen3_tok, capfd, damage):
    """A real truncated (or altered: one id byte flipped) Arrow shard is never read as ids: the digests
    recorded when the entry was written do not match, the entry is built again, with a message."""
    from pathlib import Path

    f = write_jsonl(tmp_path / "d.jsonl", sample_rows(20))
    cache = str(tmp_path / "cache")
    ds1, s1 = tokenized_dataset([str(f)], qwen3_tok, SPEC, cache)
    ids = ds1["input_ids"]
    del ds1  # the shard is memory-mapped while the dataset lives
    shard = Path(s1.cache_path) / s1.shards[0]
    size = shard.stat().st_size
    if damage == "truncated":
        os.truncate(shard, size - 100)
    else:
        data = bytearray(shard.read_bytes())
        data[size // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    ds2, s2 = tokenized_dataset([str(f)], qwen3_tok, SPEC, cache)
    err = capfd.readouterr().err
    assert s2.cache == "built" and s2.cache_path == s1.cache_path, err
    assert f"tokenized cache {s1.cache_path} is damaged ({s1.shards[0]}" in err and "building it again" in err
    assert ds2["input_ids"] == ids
    _, s3 = tokenized_dataset([str(f)], qwen3_tok, SPEC, cache)
    assert s3.cache == "hit"


def test_rows_equal_pure_renderer_and_counts(tmp_path, v1_tok):
    rows = sample_rows(10) + [conv("x " * 80, "y")]  # the last cannot fit 64 tokens at all
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    ds, stats = tokenized_dataset([str(f)], v1_tok, SPEC, str(tmp_path / "c"))
    assert stats.conversations == 11 and stats.dropped == 1 and stats.examples == 10
    assert stats.dropped_examples == [f"{f}:11"]
    for i in range(10):
        msgs = [("system", SPEC.default_system)] + [(m["role"], m["content"]) for m in rows[i]["messages"]]
        ids, labels = chatml_render(msgs, v1_tok)
        if len(ids) <= 64:
            assert (ds[i]["input_ids"], ds[i]["labels"], ds[i]["status"]) == (ids, labels, "ok")
        else:
            assert ds[i]["status"] == "truncated" and ds[i]["input_ids"] == ids[: len(ds[i]["input_ids"])]
    assert stats.truncated == sum(1 for r in ds if r["status"] == "truncated") > 0
    assert stats.tokens == sum(len(r["input_ids"]) for r in ds)
    assert stats.supervised_tokens == sum(sum(x != -100 for x in r["labels"]) for r in ds)


def test_multiprocess_map_equals_single(tmp_path, qwen3_tok):
    f = write_jsonl(tmp_path / "d.jsonl", sample_rows(1100))
    one, _ = tokenized_dataset([str(f)], qwen3_tok, SPEC, str(tmp_path / "a"), num_proc=1)
    two, _ = tokenized_dataset([str(f)], qwen3_tok, SPEC, str(tmp_path / "b"), num_proc=2)
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"]


def test_dump_one_line_per_conversation_in_order(tmp_path, qwen3_dir, qwen3_tok):
    rows = sample_rows(5) + [conv("z " * 100, "w")] + sample_rows(2)
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "dump.jsonl"
    rc = main(
        [
            "preprocess",
            "--tokenizer",
            str(qwen3_dir),
            "--data",
            str(f),
            "--max-length",
            "64",
            "--dump",
            str(out),
            f"data.cache_dir={tmp_path / 'c'}",
            "data.overlong=drop",
        ]
    )
    assert rc == 0
    dumped = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(dumped) == len(rows)
    assert dumped[5] == {"input_ids": [], "labels": [], "dropped": True}
    # the tokenizer directory's own chat template (Qwen3's: no default system prompt) renders the rows
    row6, _ = normalise(rows[6], None)
    ids, labels, _ = Renderer.of(qwen3_tok).render(row6)
    assert dumped[6] == {"input_ids": ids, "labels": labels} and ids[:3] == [
        qwen3_tok.im_start_id,
        *qwen3_tok.encode("user\n"),
    ]


def test_eval_fraction_and_eval_files(tmp_path, qwen3_dir, qwen3_tok):
    f = write_jsonl(tmp_path / "d.jsonl", sample_rows(20))
    base = {"model": {"path": str(qwen3_dir)}, "data": {"train_files": [str(f)], "cache_dir": str(tmp_path / "c")}}
    cfg = config_from_dict(base, ["data.eval_fraction=0.25"])
    data = prepare_data(cfg.data, qwen3_tok, cfg.train.seed)
    assert (len(data.train), len(data.eval)) == (15, 5)
    assert not set(data.train["source"]) & set(data.eval["source"])
    e = write_jsonl(tmp_path / "e.jsonl", sample_rows(3))
    cfg = config_from_dict(base, [f"data.eval_files=[{e}]"])
    data = prepare_data(cfg.data, qwen3_tok, cfg.train.seed)
    assert (len(data.train), len(data.eval)) == (20, 3)


def test_everything_dropped_is_an_error(tmp_path, qwen3_dir, qwen3_tok):
    from qwen_ft.errors import DataError

    f = write_jsonl(tmp_path / "d.jsonl", [conv("x " * 100, "y")])
    cfg = config_from_dict(
        {"model": {"path": "m"}, "data": {"train_files": [str(f)], "max_length": 32, "cache_dir": str(tmp_path / "c")}}
    )
    with pytest.raises(DataError, match="no training example left .* dropped 1"):
        prepare_data(cfg.data, qwen3_tok, cfg.train.seed)
