"""The real DVC pipeline on a tiny dataset, in a throwaway copy of the repo."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import build_dataset

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _sh(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "pipeline", work / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    build_dataset(work / "data" / "tiny", {"a": "happy", "b": "sad", "c": "angry"}, ["d"])
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["ingest"]["root"] = "data/tiny"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh(["git", "init", "-q"], work)
    _sh([str(BIN / "dvc"), "init", "-q"], work)
    return work


@pytest.mark.slow
def test_repro_then_nothing_then_only_the_changed_extractor(repo: Path):
    dvc = str(BIN / "dvc")
    _sh([dvc, "repro"], repo)
    manifest = (repo / "data" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 4
    assert json.loads((repo / "reports" / "extract" / "prosody.json").read_text())["done"] == 4
    assert (repo / "features" / "prosody.h5").is_file()

    assert "Data and pipelines are up to date" in _sh([dvc, "repro"], repo)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["extract"]["prosody"]["options"]["n_mfcc"] = 8
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _sh([dvc, "repro"], repo)
    assert "Running stage 'extract@prosody'" in out
    assert "Running stage 'ingest'" not in out
