import json
from dataclasses import replace

import numpy as np
import pytest

from pipeline.data import media
from pipeline.config import EngineConfig, ExtractorSpec
from pipeline.extract.engine import ExtractionFailed, _prefetch, decoder_threads, resolve_device, run_extraction
from pipeline.data.ingest import ingest
from pipeline.manifest import write_manifest
from pipeline.store import FingerprintMismatch, StoreReader


@pytest.fixture
def manifest(ingest_cfg, tmp_path):
    path = tmp_path / "manifest.jsonl"
    write_manifest(ingest(ingest_cfg), path)
    return path


def test_prosody_on_real_clips_fills_store(manifest, engine, tmp_path):
    spec = ExtractorSpec("numpy_prosody", {"n_mfcc": 5})
    summary = run_extraction("prosody", spec, engine, manifest, tmp_path / "f" / "prosody.h5",
                             summary_path=tmp_path / "r.json", progress=False)
    assert (summary.done, summary.failed, summary.skipped) == (8, 0, 0)
    with StoreReader(tmp_path / "f" / "prosody.h5") as reader:
        assert len(reader.names) == 8
        values, mask = reader.read("utterance", reader.names)
        assert mask.all() and np.isfinite(values).all()
        # the tones differ per clip (200 Hz + 40 Hz * i): the pitch mean follows them
        assert np.all(np.diff(values[:5, 0]) > 0)  # 400 Hz sits at fmax: unvoiced
        seq = reader.get(reader.names[0])["sequence"]
        assert seq.shape[1] == 4 + 5
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["done"] == 8 and report["status"] == "ok"


def test_corrupt_silent_and_no_audio_clips(manifest, engine, dataset, tmp_path):
    from fixtures_media import write_clip, write_corrupt, write_truncated

    write_corrupt(dataset / "video" / "sample_00000001.mp4")
    write_clip(dataset / "video" / "sample_00000002.mp4", seconds=0.6, audio="silent")
    write_clip(dataset / "video" / "sample_00000003.mp4", seconds=0.6, audio=None)
    # a partial download: its audio decodes without an error, to 0.45 s of the 4 s its header states
    write_truncated(write_clip(tmp_path / "whole.mp4", seconds=4.0, fps=10, audio="tone"),
                    dataset / "video" / "sample_00000005.mp4", 0.2)
    spec = ExtractorSpec("numpy_prosody", {})
    summary = run_extraction("prosody", spec, engine, manifest, tmp_path / "p.h5", progress=False)
    # the file without an audio track lacks the modality: recorded with its kind, not counted as failed
    assert (summary.failed, summary.done, summary.not_applicable, summary.no_track) == (2, 5, 1, 1)
    failures = [json.loads(x) for x in (tmp_path / "p.failures.jsonl").read_text().splitlines()]
    kinds = {f["id"]: f["kind"] for f in failures}
    assert kinds == {"sample_00000001": "unreadable_media", "sample_00000003": "no_audio_track",
                     "sample_00000005": "unreadable_media"}
    cut_off = next(f["error"] for f in failures if f["id"] == "sample_00000005")
    assert "truncated: its audio decodes to 0.45 s of the 4.00 s its header declares" in cut_off
    assert all(f["stage"] == "extract.prosody" and f["modality"] == "audio" for f in failures)
    with StoreReader(tmp_path / "p.h5") as reader:
        _, mask = reader.read("utterance", ["sample_00000002", "sample_00000004"])
        assert mask.tolist() == [False, True]  # silent: stored, but not present


def test_failure_threshold_keeps_finished_work(manifest, engine, tmp_path):
    spec = ExtractorSpec("toy", {"fail_on": "0000000"})  # 6 of 8 clips fail
    with pytest.raises(ExtractionFailed, match="6 of 8 clips failed"):
        run_extraction("toy", spec, engine, manifest, tmp_path / "t.h5", progress=False)
    assert not (tmp_path / "t.h5").exists()
    assert len(list((tmp_path / ".partial" / "t").glob("part-*.h5"))) == 2  # flush_every=1


def _interrupt_after_three(monkeypatch) -> tuple[list[str], object]:
    """The toy extractor records what it extracts and raises KeyboardInterrupt (Ctrl-C) once it has
    extracted 3 clips; returns (those clips, the original extract_batch)."""
    from toy_extractors import ToyExtractor

    calls = []
    original = ToyExtractor.extract_batch

    def counting(self, items):
        if len(calls) >= 3:
            raise KeyboardInterrupt
        calls.extend(items)
        return original(self, items)

    monkeypatch.setattr(ToyExtractor, "extract_batch", counting)
    return calls, original


def test_interrupted_run_resumes_without_redoing(manifest, engine, tmp_path, monkeypatch):
    from toy_extractors import ToyExtractor

    calls, original = _interrupt_after_three(monkeypatch)
    spec = ExtractorSpec("toy", {})
    with pytest.raises(KeyboardInterrupt):
        run_extraction("toy", spec, engine, manifest, tmp_path / "t.h5", progress=False)
    first = list(calls)
    calls.clear()
    monkeypatch.setattr(ToyExtractor, "extract_batch", original)
    monkeypatch.setattr(ToyExtractor, "extract_batch",
                        lambda self, items: calls.extend(items) or original(self, items))
    summary = run_extraction("toy", spec, engine, manifest, tmp_path / "t.h5", progress=False)
    assert summary.skipped == len(first) and not set(first) & set(calls)
    assert len(first) + len(calls) == 8

    (tmp_path / "ref").mkdir()
    run_extraction("toy", spec, engine, manifest, tmp_path / "ref" / "t.h5", progress=False)
    assert (tmp_path / "t.h5").read_bytes() == (tmp_path / "ref" / "t.h5").read_bytes()


def test_an_interrupted_run_resumed_on_another_device_redoes_its_clips(manifest, engine, tmp_path, monkeypatch):
    """A GPU's values differ from the CPU's in their last bits: segments made on cuda are not mixed
    into a store a cpu run finishes (the store would say `cpu` for every row)."""
    import h5py
    from toy_extractors import ToyExtractor

    _, original = _interrupt_after_three(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_extraction("toy", ExtractorSpec("toy", {}), engine, manifest, tmp_path / "t.h5", progress=False)
    segments = [p for p in tmp_path.rglob("*.h5") if p != tmp_path / "t.h5"]
    assert segments and all(h5py.File(p, "r").attrs["device"] == "cpu" for p in segments)
    for path in segments:  # as if that run had been on a GPU
        with h5py.File(path, "r+") as fh:
            fh.attrs["device"] = "cuda"
    monkeypatch.setattr(ToyExtractor, "extract_batch", original)
    summary = run_extraction("toy", ExtractorSpec("toy", {}), engine, manifest, tmp_path / "t.h5", progress=False)
    assert (summary.done, summary.skipped) == (8, 0)


def test_changed_params_after_interrupt_stop_with_message(manifest, engine, tmp_path):
    spec = ExtractorSpec("toy", {"fail_on": "0000000"})  # 2 clips done, 6 failed
    with pytest.raises(ExtractionFailed):
        run_extraction("toy", spec, engine, manifest, tmp_path / "t.h5", progress=False)
    with pytest.raises(FingerprintMismatch, match="params.fail_on: '0000000' -> ''"):
        run_extraction("toy", ExtractorSpec("toy", {}), engine, manifest, tmp_path / "t.h5",
                       progress=False)
    summary = run_extraction("toy", ExtractorSpec("toy", {}), engine, manifest, tmp_path / "t.h5",
                             restart=True, progress=False)
    assert summary.done == 8


def test_text_extractor_skips_clips_without_text(tmp_path, engine):
    from conftest import build_dataset

    from pipeline.config import IngestConfig

    root = build_dataset(tmp_path / "d", {"a": "sad"}, ["b"], subtitles=False)
    write_manifest(ingest(IngestConfig(root=str(root))), tmp_path / "m.jsonl")
    summary = run_extraction("toy", ExtractorSpec("toy", {}), engine, tmp_path / "m.jsonl",
                             tmp_path / "t.h5", progress=False)
    assert summary.not_applicable == 2 and summary.failed == 0


def test_device_cuda_without_gpu_is_an_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="engine.device"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="engine.device"):
        resolve_device("tpu")


def test_decode_workers_share_the_cpus_among_their_decoders(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 64)  # the machine's; the process may use 16 of them
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert decoder_threads(EngineConfig(decode_workers=8)) == 2
    assert decoder_threads(EngineConfig(decode_workers=32)) == 1
    assert decoder_threads(EngineConfig(decode_workers=2), cpus=1.0) == 1  # a Ray actor's slot
    assert decoder_threads(EngineConfig(decode_workers=8, decoder_threads=3)) == 3
    with pytest.raises(Exception, match="engine.decoder_threads"):
        EngineConfig(decoder_threads=-1)

    class Recorder:  # prepare() runs in the engine's decode threads
        def prepare(self, clip):
            return media.decoder_threads()

    got = [f.result()[0] for _, f in _prefetch(Recorder(), list(range(5)), workers=2, depth=2,
                                                threads_per_decoder=3)]
    assert got == [3] * 5 and media.decoder_threads() == 0


def test_after_dvc_removes_the_store_only_new_and_changed_clips_are_extracted(ingest_cfg, dataset, engine, tmp_path,
                                                                              monkeypatch):
    """DVC saves a stage's output in its cache and removes it before rerunning the stage. The
    rerun finds the previous store there by its MD5 (`.partial/<store>.previous.json`), so with
    one clip replaced and one added it extracts those two only, and writes the same bytes as
    extracting every clip from scratch. Other settings, other code or the copy gone from the
    cache reuse nothing; so does --restart."""
    import hashlib
    import shutil

    from fixtures_media import write_clip

    from pipeline.extract import engine as engine_module
    from pipeline.manifest import media_only, read_manifest

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(engine_module, "in_dvc_cache", lambda md5: cache / md5)
    spec = ExtractorSpec("numpy_prosody", {"n_mfcc": 5})
    store = tmp_path / "f" / "prosody.h5"

    def dvc_removes_the_output():  # `dvc repro` before it reruns a changed stage: saved in the cache, removed
        shutil.copy(store, cache / hashlib.md5(store.read_bytes()).hexdigest())
        store.unlink()

    def extract(path=store, the_spec=spec, restart=False):
        write_manifest([media_only(c) for c in ingest(ingest_cfg)], tmp_path / "media.jsonl")
        return run_extraction("prosody", the_spec, engine, tmp_path / "media.jsonl", path, progress=False,
                              restart=restart)

    first = extract()
    assert (first.done, first.skipped) == (8, 0)
    described = json.loads((tmp_path / "f" / ".partial" / "prosody.previous.json").read_text())
    assert sorted(described["clips"]) == sorted(c.name for c in read_manifest(tmp_path / "media.jsonl"))
    assert described["md5"] == hashlib.md5(store.read_bytes()).hexdigest()
    dvc_removes_the_output()
    assert extract().skipped == 8  # nothing changed: every clip from the previous run

    dvc_removes_the_output()
    write_clip(dataset / "video" / "sample_00000002.mp4", seconds=1.3, tone_hz=310.0)  # replaced under its name
    write_clip(dataset / "video" / "sample_00000200.mp4", seconds=0.8, tone_hz=520.0)  # a new clip
    extracted = []
    original = engine_module.ClipWorker.run
    monkeypatch.setattr(engine_module.ClipWorker, "run",
                        lambda self, todo, *a: extracted.extend(c.name for c in todo) or original(self, todo, *a))
    again = extract()
    assert sorted(extracted) == ["sample_00000002", "sample_00000200"] and (again.done, again.skipped) == (2, 7)
    assert extract(tmp_path / "scratch" / "prosody.h5").done == 9
    assert store.read_bytes() == (tmp_path / "scratch" / "prosody.h5").read_bytes()

    for changed in ("code", "settings", "device", "cache"):  # each alone: nothing is reused
        dvc_removes_the_output()
        extract()  # a finished store described by this code and these settings...
        dvc_removes_the_output()
        extracted.clear()
        if changed == "code":
            monkeypatch.setattr(engine_module, "code_digest", lambda: "another-version")
        if changed == "device":
            described = tmp_path / "f" / ".partial" / "prosody.previous.json"
            described.write_text(described.read_text().replace('"device": "cpu"', '"device": "cuda"'))
        if changed == "cache":
            shutil.rmtree(cache)  # `dvc gc`
            cache.mkdir()
        summary = extract(the_spec=ExtractorSpec("numpy_prosody", {"n_mfcc": 6}) if changed == "settings" else spec)
        assert (summary.done, summary.skipped) == (9, 0) and len(extracted) == 9, changed  # ...and one thing other
    dvc_removes_the_output()
    assert extract().skipped == 9  # the run just made (this code, these settings) is found...
    dvc_removes_the_output()
    assert (extract(restart=True).done, len(extracted)) == (9, 9 + 9)  # ...and --restart forgets it
    (tmp_path / "f" / ".partial" / "prosody.previous.json").write_text("{not json")
    dvc_removes_the_output()
    assert extract().done == 9  # an unreadable description: nothing reused, no crash


def test_mer_extract_again_on_a_finished_store_redoes_changed_clips_and_trusts_no_unknown_store(
        ingest_cfg, dataset, engine, tmp_path):
    """Outside DVC the finished store stays at the path. When it is the file its description
    names (by MD5), a rerun redoes only new or changed clips; a store there that nothing
    describes (copied in, or made by an older version) is extracted again whole, not trusted.
    Other settings on a finished store still stop, naming them."""
    from fixtures_media import write_clip

    from pipeline.manifest import media_only

    spec = ExtractorSpec("numpy_prosody", {"n_mfcc": 5})
    store = tmp_path / "f" / "prosody.h5"

    def extract(path=store):
        write_manifest([media_only(c) for c in ingest(ingest_cfg)], tmp_path / "media.jsonl")
        return run_extraction("prosody", spec, engine, tmp_path / "media.jsonl", path, progress=False)

    assert extract().done == 8
    write_clip(dataset / "video" / "sample_00000002.mp4", seconds=1.3, tone_hz=310.0)
    assert (extract().done, extract().skipped) == (1, 8)  # the replaced clip, then nothing
    assert extract(tmp_path / "scratch" / "prosody.h5").done == 8
    assert store.read_bytes() == (tmp_path / "scratch" / "prosody.h5").read_bytes()
    (tmp_path / "f" / ".partial" / "prosody.previous.json").unlink()  # a store nothing describes
    write_clip(dataset / "video" / "sample_00000003.mp4", seconds=1.2, tone_hz=290.0)
    assert extract().done == 8
    with pytest.raises(FingerprintMismatch, match="params.n_mfcc: 5 -> 6"):
        run_extraction("prosody", ExtractorSpec("numpy_prosody", {"n_mfcc": 6}), engine, tmp_path / "media.jsonl",
                       store, progress=False)


def test_a_clip_replaced_after_an_interrupted_run_is_extracted_again(ingest_cfg, dataset, engine, tmp_path,
                                                                     monkeypatch):
    """Segments of an interrupted run record what each clip was extracted from: a clip committed
    there and replaced before the rerun is extracted again, not merged from the segment."""
    from fixtures_media import write_clip

    from pipeline.extract import worker
    from pipeline.manifest import media_only

    spec = ExtractorSpec("numpy_prosody", {"n_mfcc": 5})

    def extract(path):
        write_manifest([media_only(c) for c in ingest(ingest_cfg)], tmp_path / "media.jsonl")
        return run_extraction("prosody", spec, engine, tmp_path / "media.jsonl", path, progress=False)

    taken = []
    original = worker.RunWriter.take

    def interrupted(self, result):
        if len(taken) == 4:
            raise KeyboardInterrupt
        taken.append(result.name)
        original(self, result)

    monkeypatch.setattr(worker.RunWriter, "take", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path / "f" / "prosody.h5")
    monkeypatch.setattr(worker.RunWriter, "take", original)
    assert len(taken) == 4  # committed: flush_every is 1
    write_clip(dataset / "video" / f"{taken[0]}.mp4", seconds=1.4, tone_hz=333.0)  # replaced before the rerun
    resumed = extract(tmp_path / "f" / "prosody.h5")
    assert (resumed.done, resumed.skipped) == (8 - 3, 3)
    assert extract(tmp_path / "scratch" / "prosody.h5").done == 8
    assert (tmp_path / "f" / "prosody.h5").read_bytes() == (tmp_path / "scratch" / "prosody.h5").read_bytes()
