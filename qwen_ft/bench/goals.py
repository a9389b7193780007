"""Merge benchmark JSON files and print one table with every goal and the estimator check.

Run: python -m qwen_ft.bench.goals bench-a.json bench-b.json ...   (the last step of scripts/gpu_check.sh)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qwen_ft.bench.report import estimate_lines, goal_lines, table


def load_records(paths: list[str]) -> list[dict]:
    """Every record of every readable file (a missing or damaged file is named, not fatal)."""
    records = []
    for p in paths:
        try:
            report = json.loads(Path(p).read_text())
            mb = report.get("micro_batch", 1)  # files written before records carried their layout
            records += [{"layout": f"{mb}x{8 // mb}", **r} for r in report["results"]]
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
            print(f"skipped {p}: {type(e).__name__}: {e}")
    return records


def main(argv: list[str]) -> int:
    records = load_records(argv)
    if not records:
        print("no benchmark results to summarise")
        return 1
    print(table(records))
    for line in goal_lines(records) + estimate_lines(records):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
