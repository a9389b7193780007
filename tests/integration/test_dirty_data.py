"""Large, dirty data (issue 31, point 7): a JSONL with 1% broken rows of every kind is tokenized with a peak
memory that does not grow with the file; the broken rows are counted by kind with their first lines
under on_error=skip, and the first one is named under on_error=error. Real files, real processes: the
1,000,000-row figures come from the same script (scripts/bench_dirty_data.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, load_script
from tests.unit.test_bad_input import KIND

SCRIPT = REPO / "scripts" / "bench_dirty_data.py"


def run(tmp_path, rows: int, on_error: str = "skip") -> dict:
    out = tmp_path / f"{rows}-{on_error}.json"
    cmd = [sys.executable, str(SCRIPT), "--rows", str(rows), "--on-error", on_error, "--dir", str(tmp_path)]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def expected_kinds(rows: int) -> dict[str, list]:
    """Counts and first line of each kind, from how the script lays the broken rows out (every 100th row,
    cycling through the kinds)."""
    bench = load_script("bench_dirty_data")
    kinds = [KIND[p.stem] for p in sorted(bench.BAD_ROWS.glob("*.jsonl"))] + ["template"]
    out: dict[str, list] = {}
    for n, line in enumerate(range(100, rows + 1, 100)):
        entry = out.setdefault(kinds[n % len(kinds)], [0, line])
        entry[0] += 1
    return out


def test_dirty_file_counted_by_kind_with_bounded_memory(tmp_path):
    small, large = run(tmp_path, 2_000), run(tmp_path, 40_000)
    for result in (small, large):
        rows = result["rows"]
        got = {kind: [n, int(first.rsplit(":", 1)[1])] for kind, (n, first) in result["skipped_kinds"].items()}
        assert got == expected_kinds(rows)
        assert result["skipped"] == result["broken"] == rows // 100
        assert result["examples"] == rows - rows // 100
    # twenty times the rows, the same memory: anonymous memory (the mapped Arrow files' pages aside) within 15 MB
    assert large["peak_anon_rss_mb"] - small["peak_anon_rss_mb"] < 15, (small, large)


def test_dirty_file_refused_naming_the_first_broken_row(tmp_path):
    result = run(tmp_path, 4_000, "error")
    first = result["error"][0]
    assert first.startswith("40 bad row(s) of 4000; the first: ") and "dirty.jsonl:100: " in first, first
