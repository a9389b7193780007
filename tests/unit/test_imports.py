"""Imports point one way through the package: config -> tokenizer -> data -> model -> train ->
(export, infer, sizing) -> recipe -> api -> bench -> cli, with the leaf modules (errors, deps, files,
quiet, version) below them all; no module imports one above it, and no import circle exists, counting
the imports made inside functions too (read from the source, nothing imported)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "qwen_ft"
FLOORS = {
    "errors": 0,
    "deps": 0,
    "files": 0,
    "quiet": 0,
    "version": 0,
    "config": 1,
    "tokenizer": 2,
    "data": 3,
    "model": 4,
    "train": 5,
    "export": 6,
    "infer": 6,
    "sizing": 6,
    "recipe": 7,
    "api": 8,
    "bench": 9,
    "cli": 10,
}
TOP = 11  # the package itself (`qwen_ft.finetune` etc. are the API's, imported on first use)


def modules() -> dict[str, Path]:
    found = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = f
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def floor(module: str) -> int:
    parts = module.split(".")
    return TOP if len(parts) == 1 else FLOORS[parts[1]]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_subpackage_has_a_floor():
    assert {m.split(".")[1] for m in modules() if "." in m} <= set(FLOORS)


def test_no_import_points_up():
    edges = graph()
    up = [f"{v} -> {w}" for v, ws in sorted(edges.items()) for w in sorted(ws) if floor(w) > floor(v)]
    assert not up, "imports pointing up the data flow:\n" + "\n".join(up)


def test_no_import_circles():
    assert not cycles(graph())


def test_the_checks_find_what_they_look_for():
    """A circle and an upward import, made up, are found (so an empty result above means something)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert floor("qwen_ft.train.loop") > floor("qwen_ft.data.collate") and floor("qwen_ft") == TOP
    edges = graph()
    assert "qwen_ft.data.schema" in edges["qwen_ft.data.formats"]  # function-level and top-level imports alike
    assert "qwen_ft.data.tables" in edges["qwen_ft.data.sources"]  # imported inside iter_rows
