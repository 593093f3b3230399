"""The voice store (extractor voice_encoder): Resemblyzer's GE2E weights, rebuilt and loaded with
weights_only, on real speech: the demo's RAVDESS actors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from fixtures_media import write_clip

from pipeline.backends import voice
from pipeline.config import EngineConfig, ExtractorSpec
from pipeline.errors import ModelMissing
from pipeline.extract.engine import run_extraction
from pipeline.extractors.base import get_extractor
from pipeline.manifest import Clip, write_manifest
from pipeline.store import StoreReader

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
pytestmark = pytest.mark.skipif(voice.packaged_weights() is None, reason="resemblyzer not installed (make install)")


def test_mel_is_librosas():
    import librosa

    audio = np.random.default_rng(0).standard_normal(16000 + 123).astype(np.float32) * 0.1
    ours = voice.mel_spectrogram(audio)
    theirs = librosa.feature.melspectrogram(y=audio, sr=16000, n_fft=400, hop_length=160, n_mels=40).T
    assert ours.shape == theirs.shape == (101, 40)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6 * theirs.max())
    assert voice.partials(audio[:8000]).shape == (1, 160, 40)  # shorter than 1.6 s: one padded window
    assert voice.partials(np.zeros(16000 * 4, np.float32)).shape == (4, 160, 40)  # 401 frames, a 0.8 s hop


def _actors(per_actor: int = 4) -> dict[str, list[str]]:
    with (DEMO / "track1_train_disdim.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    by_actor: dict[str, list[str]] = {}
    for row in rows:
        by_actor.setdefault(row["group"], []).append(row["name"])
    return {a: names[:per_actor] for a, names in sorted(by_actor.items()) if len(names) >= per_actor}


def test_a_voice_is_nearer_itself_than_other_voices(tmp_path):
    """Real speech, real weights: clips of one RAVDESS actor (other sentences, other emotions)
    lie closer together than clips of different actors; a silent clip has no voice."""
    actors = dict(list(_actors().items())[:4])
    clips = [Clip(name=n, video=str(DEMO / "video" / f"{n}.mp4"), group=a) for a, names in actors.items()
             for n in names]
    clips.append(Clip(name="silent", video=str(write_clip(tmp_path / "silent.mp4", seconds=1.0, audio="silent"))))
    write_manifest(clips, tmp_path / "manifest.jsonl")
    summary = run_extraction("speaker", ExtractorSpec(extractor="voice_encoder"), EngineConfig(batch_size=4),
                             tmp_path / "manifest.jsonl", tmp_path / "speaker.h5", progress=False)
    assert (summary.done, summary.failed) == (len(clips), 0)
    with StoreReader(tmp_path / "speaker.h5") as reader:
        emb, mask = reader.read("utterance", [c.name for c in clips])
    assert emb.shape == (len(clips), 256) and np.isfinite(emb).all()
    assert mask[:-1].all() and not mask[-1]
    emb, groups = emb[:-1], np.array([c.group for c in clips[:-1]])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    cos, same = emb @ emb.T, groups[:, None] == groups[None, :]
    off_diagonal = ~np.eye(len(emb), dtype=bool)
    within, between = cos[same & off_diagonal].mean(), cos[~same].mean()
    assert within > between + 0.05, (within, between)
    # each clip's nearest other clip is its own actor's far more often than chance (3 of 15)
    nearest = np.where(off_diagonal, cos, -2).argmax(axis=1)
    assert (groups[nearest] == groups).mean() >= 0.5


def test_named_weights_that_are_missing_stop_with_the_params_key(tmp_path):
    extractor = get_extractor("voice_encoder")({"model_path": str(tmp_path / "none.pt")})
    with pytest.raises(ModelMissing, match="model_path"):
        extractor.model_identity()
    identity = get_extractor("voice_encoder")({}).model_identity()
    assert identity["weights"]["file"] == "pretrained.pt"
