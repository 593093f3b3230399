"""`engine.runner: ray` against the local engine: same store, same failures, resume, dead workers.

Each Ray run starts its own local cluster of 2 CPUs (as `ray_address: null` does in params),
so the toy extractor's TOY_* variables, set before the run, reach the workers. The tests
that need Ray skip without it; `make test` installs it.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import build_dataset
from fixtures_media import write_clip, write_corrupt

from pipeline.config import ConfigError, EngineConfig, ExtractorSpec, IngestConfig, from_dict
from pipeline.extract.engine import run_extraction
from pipeline.data.ingest import ingest
from pipeline.manifest import write_manifest
from pipeline.store import StoreReader

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
LOCAL = EngineConfig(device="cpu", batch_size=2, decode_workers=1, flush_every=2, max_failed_fraction=0.5)
RAY = replace(LOCAL, runner="ray", ray_workers=2)


def needs_ray() -> None:
    pytest.importorskip("ray")


def assert_same_store(a: Path, b: Path) -> None:
    with StoreReader(a) as left, StoreReader(b) as right:
        assert left.names == right.names and left.keys == right.keys
        assert left.attrs["fingerprint"] == right.attrs["fingerprint"]
        for name in left.names:
            x, y = left.get(name), right.get(name)
            for key in left.keys:
                assert x[key].shape == y[key].shape, (name, key)
                np.testing.assert_allclose(x[key], y[key], rtol=1e-5, atol=1e-6, err_msg=f"{name}/{key}")


@pytest.fixture
def demo_manifest(tmp_path: Path) -> Path:
    """12 demo clips plus three that go wrong: corrupt, no audio track, text only."""
    clips = ingest(IngestConfig(root=str(REPO / "data" / "demo")))[:12]
    broken = [
        replace(clips[0], name="sample_corrupt", video=str(write_corrupt(tmp_path / "corrupt.mp4"))),
        replace(clips[1], name="sample_mute",
                video=str(write_clip(tmp_path / "mute.mp4", seconds=0.6, audio=None))),
        replace(clips[2], name="sample_text_only", video=None, audio=None),
    ]
    path = tmp_path / "manifest.jsonl"
    write_manifest(clips[:3] + broken[:1] + clips[3:7] + broken[1:] + clips[7:], path)
    return path


@pytest.fixture
def toy_manifest(tmp_path: Path) -> tuple[Path, list[str]]:
    names = [f"clip_{i:03d}" for i in range(24)]
    root = build_dataset(tmp_path / "ds", {n: "happy" for n in names}, [], video=False)
    path = tmp_path / "toy.jsonl"
    write_manifest(ingest(IngestConfig(root=str(root))), path)
    return path, names


def _extract(engine: EngineConfig, spec: ExtractorSpec, manifest: Path, folder: Path, store: str):
    folder.mkdir(parents=True, exist_ok=True)
    summary = run_extraction(store, spec, engine, manifest, folder / f"{store}.h5",
                             summary_path=folder / "summary.json", progress=False)
    return summary, folder / f"{store}.h5"


@pytest.mark.slow
def test_ray_store_equals_local_store_failures_included(demo_manifest, tmp_path):
    needs_ray()
    spec = ExtractorSpec("numpy_prosody", {"n_mfcc": 5})
    local, local_store = _extract(LOCAL, spec, demo_manifest, tmp_path / "local", "prosody")
    remote, ray_store = _extract(RAY, spec, demo_manifest, tmp_path / "ray", "prosody")

    counts = lambda s: (s.clips, s.done, s.failed, s.not_applicable, s.skipped)  # noqa: E731
    assert counts(local) == counts(remote) == (15, 12, 1, 2, 0)  # the mute clip lacks the modality
    assert_same_store(local_store, ray_store)
    failures = local_store.with_suffix(".failures.jsonl").read_text()
    assert failures == ray_store.with_suffix(".failures.jsonl").read_text()
    assert [json.loads(x)["kind"] for x in failures.splitlines()] == ["unreadable_media", "no_audio_track"]
    report = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert report["status"] == "ok" and report["device"] == "cpu" and report["model_seconds"] > 0


@pytest.mark.slow
def test_worker_killed_mid_run_still_gives_the_complete_equal_store(toy_manifest, tmp_path, monkeypatch,
                                                                    caplog):
    needs_ray()
    manifest, names = toy_manifest
    spec = ExtractorSpec("toy", {"dim": 8})
    _, reference = _extract(LOCAL, spec, manifest, tmp_path / "local", "toy")

    died = tmp_path / "died"
    monkeypatch.setenv("TOY_DIE_ON", names[9])  # kill -9 of the worker on this clip, once
    monkeypatch.setenv("TOY_DIE_ONCE", str(died))
    monkeypatch.setenv("TOY_SLEEP", "0.02")
    summary, store = _extract(RAY, spec, manifest, tmp_path / "ray", "toy")
    assert died.exists(), "the worker never died: the test proves nothing"
    assert "Ray worker died" in caplog.text
    assert (summary.done, summary.failed) == (24, 0)
    assert store.read_bytes() == reference.read_bytes()  # the same store, byte for byte

    start = time.monotonic()  # all done: a rerun skips every clip and starts no cluster
    again, _ = _extract(RAY, spec, manifest, tmp_path / "ray", "toy")
    assert (again.skipped, again.done) == (24, 0) and time.monotonic() - start < 3


@pytest.mark.slow
def test_clip_that_kills_every_worker_is_recorded_as_worker_died(toy_manifest, tmp_path, monkeypatch):
    needs_ray()
    manifest, names = toy_manifest
    spec = ExtractorSpec("toy", {"dim": 8})
    monkeypatch.setenv("TOY_DIE_ON", names[5])
    summary, store = _extract(RAY, spec, manifest, tmp_path / "ray", "toy")
    assert (summary.done, summary.failed) == (23, 1)
    (failure,) = [json.loads(x) for x in store.with_suffix(".failures.jsonl").read_text().splitlines()]
    assert failure["id"] == names[5] and failure["kind"] == "worker_died"
    assert failure["stage"] == "extract.toy" and failure["modality"] == "text"
    with StoreReader(store) as reader:
        assert reader.names == [n for n in names if n != names[5]]


def _driver_script(tmp_path: Path) -> Path:
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import toy_extractors  # registers "toy"
        from pipeline.config import EngineConfig, ExtractorSpec
        from pipeline.extract.engine import run_extraction
        engine = EngineConfig(device="cpu", batch_size=1, flush_every=1, runner="ray", ray_workers=2)
        run_extraction("toy", ExtractorSpec("toy", {{"dim": 8}}), engine, sys.argv[1], sys.argv[2],
                       progress=False)
    """))
    return script


@pytest.mark.slow
def test_killed_ray_run_resumes_without_redoing_committed_clips(toy_manifest, tmp_path, monkeypatch):
    needs_ray()
    manifest, names = toy_manifest
    store, log = tmp_path / "ray" / "toy.h5", tmp_path / "calls.log"
    store.parent.mkdir()
    env = {**os.environ, "TOY_SLEEP": "0.2", "TOY_CALL_LOG": str(log)}
    proc = subprocess.Popen([sys.executable, str(_driver_script(tmp_path)), str(manifest), str(store)],
                            env=env)
    parts = store.parent / ".partial" / "toy"
    deadline = time.monotonic() + 90
    while len(list(parts.glob("part-*.h5"))) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # the driver: its Ray cluster and workers go with it
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not store.exists()
    committed = set()
    for part in parts.glob("part-*.h5"):
        with StoreReader(part) as reader:
            committed.update(reader.names)
    before = set(log.read_text().split())
    assert 6 <= len(committed) < len(names) and committed <= before

    # The killed run's workers may still finish a clip or two (Ray reaps them within a second or
    # so); they cannot touch the store, only the driver writes. Log the rerun elsewhere.
    log = tmp_path / "rerun.log"
    monkeypatch.setenv("TOY_CALL_LOG", str(log))
    summary = run_extraction("toy", ExtractorSpec("toy", {"dim": 8}), replace(RAY, batch_size=1),
                             manifest, store, progress=False)
    after = log.read_text().split()
    assert not committed & set(after), "a committed clip was computed again"
    assert sorted(after) == sorted(set(names) - committed)  # the rest, each exactly once
    assert summary.skipped == len(committed) and summary.done == len(names) - len(committed)
    _, reference = _extract(LOCAL, ExtractorSpec("toy", {"dim": 8}), manifest, tmp_path / "local", "toy")
    assert store.read_bytes() == reference.read_bytes()


def test_runner_is_validated_with_the_params_key():
    assert from_dict(EngineConfig, {"runner": "ray", "ray_address": "auto", "ray_workers": 2}).runner == "ray"
    assert from_dict(EngineConfig, {}).runner == "local"
    with pytest.raises(ConfigError, match=r"engine.runner.*spark.*local \| ray"):
        from_dict(EngineConfig, {"runner": "spark"}, "engine")
    with pytest.raises(ConfigError, match="engine.ray_workers"):
        from_dict(EngineConfig, {"ray_workers": -1}, "engine")
    with pytest.raises(ConfigError, match="engine.ray_address"):
        from_dict(EngineConfig, {"ray_address": 6379}, "engine")


def test_ray_runner_without_ray_says_how_to_install(toy_manifest, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    with pytest.raises(ConfigError, match=r"ray is not installed: pip install -e '\.\[ray\]'"):
        run_extraction("toy", ExtractorSpec("toy", {}), RAY, toy_manifest[0], tmp_path / "t.h5", progress=False)


class _RecordingRay:
    """Stands in for the `ray` module where only `connect`'s call to ray.init is under test."""

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.calls.append(kwargs)


def test_a_local_cluster_gets_the_cpus_this_process_may_use(monkeypatch):
    from pipeline.extract import ray as ray_engine

    monkeypatch.setattr(ray_engine, "usable_cpus", lambda: 3)  # e.g. a container limited to 3 of 64 cores
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    fake = _RecordingRay()
    assert ray_engine.connect(fake, replace(RAY, ray_address=None, ray_workers=2, ray_cpus_per_worker=1))
    assert fake.calls[-1]["num_cpus"] == 3 and fake.calls[-1]["address"] == "local"
    # asking for more workers than that still gets them their CPUs
    ray_engine.connect(fake, replace(RAY, ray_address=None, ray_workers=4, ray_cpus_per_worker=1.5))
    assert fake.calls[-1]["num_cpus"] == 6
