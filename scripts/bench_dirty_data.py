"""Large, dirty data: tokenize an N-row JSONL of which 1% is broken (every kind of bad row the pipeline
refuses), report time, peak RSS and the counts by kind.

Run: python scripts/bench_dirty_data.py --rows 1000000 [--on-error skip|error] [--num-proc 1] [--out r.json]

The file is written streaming (it never exists in memory); the broken rows are the ones in
tests/assets/bad_rows/ (one per kind: malformed JSON, not UTF-8, lone surrogate, not an object, unknown
format, no reply, bad message, bad content, media part, bad tool call, bad weight) plus a row the chat
template refuses (no user turn, through the Qwen3.5 template). Tokenization uses the real Qwen3
vocabulary. Peak RSS is this process's maximum resident set (getrusage), so run one size per process.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAD_ROWS = ROOT / "tests" / "assets" / "bad_rows"
NO_USER = json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode()  # the template refuses it


def broken_rows() -> list[bytes]:
    """One raw line per kind of bad row (the test assets, and the template's refusal)."""
    return [p.read_bytes().rstrip(b"\n") for p in sorted(BAD_ROWS.glob("*.jsonl"))] + [NO_USER]


def write_file(path: Path, rows: int, every: int = 100) -> dict[str, int]:
    """`rows` rows, every `every`-th (1%) broken, cycling through the kinds; returns how many are broken."""
    bad = broken_rows()
    n_bad = 0
    with open(path, "wb") as fh:
        for i in range(rows):
            if i % every == every - 1:
                fh.write(bad[n_bad % len(bad)] + b"\n")
                n_bad += 1
                continue
            row = {
                "messages": [
                    {"role": "user", "content": f"Question {i}: what is {i % 97} + {i % 13}?"},
                    {"role": "assistant", "content": f"It is {i % 97 + i % 13}. Row {i} of the file."},
                ]
            }
            fh.write(json.dumps(row).encode() + b"\n")
    return {"rows": rows, "broken": n_bad}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class AnonPeak:
    """The peak of this process's anonymous resident memory (RssAnon), sampled every 20 ms: the RSS peak also
    counts pages of the memory-mapped Arrow files that were read, which the kernel drops under pressure."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_anon_mb())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_mb())


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tokenize(path: Path, cache: Path, on_error: str, num_proc: int) -> dict:
    """Tokenize the file as training does; the stats, or the error's first lines."""
    import qwen_ft.tokenizer
    from qwen_ft.data.template import find_template
    from qwen_ft.data.tokenize import TokenizeSpec, tokenized_dataset
    from qwen_ft.errors import DataError
    from qwen_ft.tokenizer import load_tokenizer
    from qwen_ft.tokenizer.bundled import bundled_files

    tok_dir = bundled_files("qwen3")[0].parent
    template = find_template(tok_dir, str(Path(qwen_ft.tokenizer.__file__).parent / "templates" / "qwen35.jinja"))
    spec = TokenizeSpec(256, "truncate", "assistant", "", on_error, template)  # type: ignore[arg-type]
    tok = load_tokenizer(tok_dir)
    start = time.perf_counter()
    try:
        _, stats = tokenized_dataset([str(path)], tok, spec, str(cache), num_proc)
        result = {
            "examples": stats.examples,
            "skipped": stats.skipped,
            "skipped_kinds": stats.skipped_kinds,
            "tokens": stats.tokens,
        }
    except DataError as e:
        result = {"error": str(e).splitlines()[:3]}
    return {"seconds": round(time.perf_counter() - start, 1), **result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--on-error", choices=["skip", "error"], default="skip")
    ap.add_argument("--num-proc", type=int, default=1)
    ap.add_argument("--dir", help="where to write the file and cache (default: a temporary directory)")
    ap.add_argument("--out", help="write the result JSON here too")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "dirty.jsonl"
        made = write_file(path, args.rows)
        with AnonPeak() as anon:
            tokenized = tokenize(path, Path(tmp) / "cache", args.on_error, args.num_proc)
        result = {
            **made,
            "file_mb": round(path.stat().st_size / 2**20, 1),
            "on_error": args.on_error,
            **tokenized,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_anon_rss_mb": round(anon.peak, 1),
        }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
