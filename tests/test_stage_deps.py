"""Every DVC stage's deps cover the code it runs: the import closure of its `python -m` module
inside `pipeline/` (static imports, lazy ones included, plus every extractor the registry loads)
must sit under a dep of that stage in dvc.yaml, so a code change always reruns the stage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from test_layout import PACKAGE, imports, modules

REPO = PACKAGE.parent
REGISTRY = "pipeline.extractors.base"  # get_extractor() imports every module of pipeline/extractors


def closure(start: str) -> set[str]:
    mods = modules()
    known = set(mods)
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in mods:
            continue
        seen.add(name)
        todo += imports(name, mods[name], known)
        if name == REGISTRY:
            todo += [m for m in mods if m.startswith("pipeline.extractors.")]
        parent = name.rpartition(".")[0]
        if parent in mods:
            todo.append(parent)  # importing a module runs its package's __init__
    return seen


def stages() -> dict[str, tuple[str, list[str]]]:
    """stage -> (module its cmd runs, deps)."""
    out = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        module = re.search(r"python -m (\S+)", body["cmd"]).group(1)
        out[name] = (module, [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])])
    return out


@pytest.mark.parametrize("stage", sorted(stages()))
def test_deps_cover_the_import_closure(stage):
    module, deps = stages()[stage]
    files = {str(modules()[m].relative_to(REPO)) for m in closure(module)}
    covered = {f for f in files if any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)}
    assert files - covered == set(), f"dvc.yaml stage {stage!r} misses {sorted(files - covered)}"
