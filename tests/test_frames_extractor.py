"""The global-frame extractor end to end through the engine, with both encoder backends."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_image_encoders import TINY_CLIP, write_tiny_open_clip

from pipeline.config import ExtractorSpec
from pipeline.extract.engine import ModelMissingError, run_extraction
from pipeline.extractors.base import get_extractor
from pipeline.data.ingest import ingest
from pipeline.manifest import read_manifest, write_manifest
from pipeline.store import StoreReader


@pytest.fixture
def manifest(ingest_cfg, tmp_path):
    path = tmp_path / "manifest.jsonl"
    write_manifest(ingest(ingest_cfg), path)
    return path


def test_efficientnet_frames_end_to_end(manifest, engine, tmp_path):
    spec = ExtractorSpec("frames", {"num_frames": 3})
    summary = run_extraction("frames", spec, engine, manifest, tmp_path / "frames.h5",
                             summary_path=tmp_path / "r.json", progress=False)
    assert (summary.done, summary.failed, summary.not_applicable) == (8, 0, 0)
    with StoreReader(tmp_path / "frames.h5") as reader:
        utterance, mask = reader.read("utterance", reader.names)
        sequences, _ = reader.read_sequences("sequence", reader.names)
    assert mask.all() and utterance.shape == (8, 1280) and np.isfinite(utterance).all()
    assert all(seq.shape == (3, 1280) for seq in sequences)
    np.testing.assert_allclose(utterance[0], sequences[0].mean(axis=0), atol=1e-6)
    # the fixture's frames brighten over the clip: the sampled frames differ
    assert not np.allclose(sequences[0][0], sequences[0][2], atol=1e-3)
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "ok"


def test_batch_across_clips_equals_one_clip_at_a_time(manifest):
    extractor = get_extractor("frames")({"num_frames": 2, "encoder_options": {"max_batch": 3}})
    extractor.load("cpu")
    items = [extractor.prepare(clip) for clip in read_manifest(manifest)[:3]]
    batched = extractor.extract_batch(items)
    for item, out in zip(items, batched):
        alone = extractor.extract_batch([item])[0]
        assert out["sequence"].shape == (2, 1280) and out["sequence"].dtype == np.float32
        np.testing.assert_allclose(out["sequence"], alone["sequence"], atol=1e-4)
        np.testing.assert_allclose(out["utterance"], alone["utterance"], atol=1e-4)


def test_open_clip_frames_end_to_end(manifest, engine, tmp_path):
    checkpoint = write_tiny_open_clip(tmp_path / "clip", ".safetensors")
    spec = ExtractorSpec("frames", {"encoder": "open_clip", "num_frames": 2,
                                    "encoder_options": {"model": TINY_CLIP, "checkpoint": str(checkpoint)}})
    summary = run_extraction("frames", spec, engine, manifest, tmp_path / "clip.h5", progress=False)
    assert summary.done == 8
    with StoreReader(tmp_path / "clip.h5") as reader:
        sequences, _ = reader.read_sequences("sequence", reader.names)
    assert all(seq.shape == (2, 16) for seq in sequences)
    np.testing.assert_allclose(np.linalg.norm(sequences[0], axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("options", [{"model": "ViT-L-14"},
                                     {"model": "ViT-L-14", "checkpoint": "/nowhere/model.bin"}])
def test_missing_open_clip_checkpoint_names_params_key(manifest, engine, tmp_path, options):
    spec = ExtractorSpec("frames", {"encoder": "open_clip", "encoder_options": options})
    with pytest.raises(ModelMissingError, match=r"'extract\.frames\.options\.encoder_options\.checkpoint'"):
        run_extraction("frames", spec, engine, manifest, tmp_path / "f.h5", progress=False)
    assert not (tmp_path / "f.h5").exists()


def test_clips_without_video_are_not_applicable(tmp_path, engine):
    from conftest import build_dataset

    from pipeline.config import IngestConfig

    root = build_dataset(tmp_path / "d", {"a": "sad"}, ["b"], video=False)
    write_manifest(ingest(IngestConfig(root=str(root))), tmp_path / "m.jsonl")
    summary = run_extraction("frames", ExtractorSpec("frames", {}), engine, tmp_path / "m.jsonl",
                             tmp_path / "f.h5", progress=False)
    assert summary.not_applicable == 2 and summary.failed == 0


def test_bad_options_fail_before_work():
    frames = get_extractor("frames")
    with pytest.raises(ValueError, match="known: efficientnet_lite0, open_clip"):
        frames({"encoder": "resnet"})
    with pytest.raises(ValueError, match="encoder_options.max_bach"):
        frames({"encoder_options": {"max_bach": 4}})
    with pytest.raises(ValueError, match="num_frames"):
        frames({"num_frames": 0})


def test_bench_reports_engine_and_naive(manifest, engine, tmp_path):
    from pipeline.bench.extract import bench

    checkpoint = write_tiny_open_clip(tmp_path / "clip")  # tiny model: the test measures plumbing
    spec = ExtractorSpec("frames", {"encoder": "open_clip", "num_frames": 2,
                                    "encoder_options": {"model": TINY_CLIP, "checkpoint": str(checkpoint)}})
    report = bench("frames", spec, engine, manifest, limit=3)
    assert report["engine"]["done"] == 3 and report["clips"] == 3
    assert report["engine"]["clips_per_second"] > 0 and report["naive"]["clips_per_second"] > 0
    assert report["engine_over_naive"] > 0
    assert report["naive_engine_runtime"] is None  # open_clip has one runtime: no third run
    json.dumps(report)  # JSON-able as written


def test_bench_naive_loop_runs_every_model_in_pytorch(manifest, engine):
    from pipeline.bench.extract import bench, pytorch_spec

    frames = ExtractorSpec("frames", {"num_frames": 2, "encoder_options": {"max_batch": 4}})
    assert pytorch_spec(frames).options == {"num_frames": 2, "encoder_options": {"max_batch": 4, "runtime": "torch"}}
    faces = pytorch_spec(ExtractorSpec("faces", {}))
    assert faces.options == {"expression_runtime": "torch", "encoder_options": {"runtime": "torch"}}
    clip = ExtractorSpec("frames", {"encoder": "open_clip", "encoder_options": {"checkpoint": "x"}})
    assert pytorch_spec(clip) == clip  # no runtime choice
    assert pytorch_spec(ExtractorSpec("numpy_prosody", {})) == ExtractorSpec("numpy_prosody", {})
    report = bench("frames", frames, engine, manifest, limit=2)
    assert report["naive"]["options"]["encoder_options"]["runtime"] == "torch"
    assert report["naive_engine_runtime"]["clips_per_second"] > 0
    assert report["engine_over_naive_engine_runtime"] > 0
