"""`kill -9` a real process halfway through writing a store, rerun, compare."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import build_dataset

from pipeline.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.manifest import write_manifest
from pipeline.store import StoreReader

TESTS = Path(__file__).resolve().parent
N_CLIPS = 40


def _script(tmp_path: Path) -> Path:
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import toy_extractors  # registers "toy"
        from pipeline.config import EngineConfig, ExtractorSpec
        from pipeline.extract.engine import run_extraction
        engine = EngineConfig(device="cpu", batch_size=1, decode_workers=2, flush_every=1)
        run_extraction("toy", ExtractorSpec("toy", {{"dim": 16}}), engine, sys.argv[1], sys.argv[2],
                       progress=False)
    """))
    return script


def _run(script: Path, manifest: Path, store: Path, log: Path, sleep: str) -> subprocess.Popen:
    env = {**os.environ, "TOY_SLEEP": sleep, "TOY_CALL_LOG": str(log)}
    return subprocess.Popen([sys.executable, str(script), str(manifest), str(store)], env=env)


@pytest.mark.slow
def test_kill_9_halfway_then_rerun_gives_the_uninterrupted_store(tmp_path):
    names = {f"clip_{i:03d}": "happy" for i in range(N_CLIPS)}
    root = build_dataset(tmp_path / "ds", names, [], video=False)
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(ingest(IngestConfig(root=str(root))), manifest)
    script = _script(tmp_path)
    store, log = tmp_path / "killed" / "toy.h5", tmp_path / "killed.log"
    store.parent.mkdir()

    proc = _run(script, manifest, store, log, sleep="0.05")
    parts = store.parent / ".partial" / "toy"
    deadline = time.monotonic() + 60
    while len(list(parts.glob("part-*.h5"))) < N_CLIPS // 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not store.exists()
    calls_before = log.read_text().split()
    assert 0 < len(calls_before) < N_CLIPS

    log.unlink()
    assert _run(script, manifest, store, log, sleep="0").wait() == 0
    calls_after = log.read_text().split()
    # Only a clip in flight at the kill (computed but not yet committed) may be redone.
    redone = set(calls_before) & set(calls_after)
    assert len(redone) <= 1, redone
    assert Counter(calls_before + calls_after).keys() == set(names)

    reference = tmp_path / "reference" / "toy.h5"
    reference.parent.mkdir()
    assert _run(script, manifest, reference, tmp_path / "ref.log", sleep="0").wait() == 0
    with StoreReader(store) as resumed:
        assert resumed.names == sorted(names)  # every clip exactly once, manifest order
    assert store.read_bytes() == reference.read_bytes()  # same values, same bytes
    assert not parts.exists()
