"""The house rules of the package, measured on its import graph (static imports, lazy ones included):
no import circle, at most one import running back up a layer, no module over 400 lines, at most
12 modules at the package's top level, and user errors from the one base class."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# Layers, bottom first. A module may import its own layer or lower ones.
LAYERS = {
    "errors": 0,
    "schema": 1, "config": 1, "devices": 1, "tables": 1, "labels": 1, "manifest": 1, "store": 1,
    "data": 2, "backends": 2,
    "extractors": 3, "llm": 3,
    "extract": 4,
    "refine": 5, "fusion": 5, "check": 5, "browser": 5,
    "stages": 6, "cli": 6, "bench": 6,
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports anywhere in its body."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "pipeline":
                found.add(target)
    return found


def layer(name: str) -> int:
    return LAYERS[name.split(".")[1]]


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items() if name != "pipeline"}


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(nxt_name := node, set())):
            if nxt.endswith("__init__") or nxt == nxt_name:
                continue
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, circles


def test_at_most_one_import_back_up_a_layer():
    up = sorted((a, b) for a, targets in graph().items() for b in targets if layer(b) > layer(a))
    assert len(up) <= 1, up


def test_module_sizes_and_top_level_count():
    too_long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not too_long, too_long
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 12, top
    assert set(LAYERS) == {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def test_stage_boundary_imports_only_the_errors():
    assert imports("pipeline.stages", PACKAGE / "stages" / "__init__.py", set(modules())) == {"pipeline.errors"}
