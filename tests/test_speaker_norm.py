"""Speaker normalisation (train.speaker_norm): when it applies, what it does to the stores, and
that it removes who-speaks from what the classifier reads."""

import numpy as np
import pytest
import torch
from conftest import build_dataset, write_csv

from pipeline.config import FusionConfig, IngestConfig, TrainConfig
from pipeline.data.ingest import ingest
from pipeline.errors import MerError, TrainError
from pipeline.fusion.features import (MIN_SPEAKER_CLIPS, Features, load_features, normalize_by_groupings,
                                      normalize_per_speaker, speaker_groupings)
from pipeline.fusion.speakers import cluster_counts, voice_groupings
from pipeline.store import StoreIdentity, StoreWriter
from pipeline.fusion.train import cross_validate
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip


def speakers(n_speakers=12, per_speaker=30, offset=4.0, seed=0):
    """Labels carried by a weak class direction; each speaker shifts every vector a lot."""
    rng = np.random.default_rng(seed)
    n = n_speakers * per_speaker
    y, g = np.arange(n) % 6, np.repeat(np.arange(n_speakers), per_speaker)
    x = (rng.standard_normal((6, 16))[y] + offset * rng.standard_normal((n_speakers, 16))[g]
         + 0.8 * rng.standard_normal((n, 16)))
    clips = [Clip(name=f"c{i:03d}", label=EMOTIONS[y[i]], split="labelled", group=f"spk{g[i]}") for i in range(n)]
    return clips, Features([c.name for c in clips], {"voice": x.astype(np.float32)}, np.ones((n, 1), bool),
                           ["voice"]), y


def test_auto_applies_to_speakers_not_to_dialogues_or_missing_groups():
    clips, _, _ = speakers()
    for mode in ("auto", "on"):
        groupings, kind, _ = speaker_groupings(clips, mode, None)
        assert kind == "named" and groupings == [[c.group for c in clips]]
    assert speaker_groupings(clips, "off", None)[0] == []
    dialogues = [Clip(name=f"d{i}", group=f"dia{i // 9}") for i in range(90)]  # MELD: ~9 utterances each
    groupings, _, why = speaker_groupings(dialogues, "auto", None)
    assert not groupings and "median of 9 clips" in why and "no voice store" in why
    unnamed = clips[:-1] + [Clip(name="x")]
    groupings, _, why = speaker_groupings(unnamed, "auto", None)
    assert not groupings and "1 of 360 clips name no group" in why and "x" in why
    with pytest.raises(TrainError, match="train.speaker_norm' is on, but 1 of 360 clips name no group"):
        speaker_groupings(unnamed, "on", None)


def voices(n_speakers=8, per_speaker=40, seed=0):
    """Unit voice vectors: a speaker's own direction plus per-clip scatter (emotion, channel)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_speakers, 32))
    g = np.repeat(np.arange(n_speakers), per_speaker)
    v = centres[g] + 0.35 * rng.standard_normal((len(g), 32))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32), g


def test_voice_clusters_at_each_resolution_never_split_a_speaker():
    assert cluster_counts(320, MIN_SPEAKER_CLIPS) == [2, 3, 4, 6, 8]
    assert cluster_counts(80, MIN_SPEAKER_CLIPS) == [2] and cluster_counts(30, MIN_SPEAKER_CLIPS) == []
    emb, g = voices()
    present = np.ones(len(g), bool)
    present[5] = False  # a silent clip: no voice, no pseudo-speaker
    groupings, what = voice_groupings(emb, present, MIN_SPEAKER_CLIPS)
    assert [len({x for x in grouping if x}) for grouping in groupings] == [2, 3, 4, 6, 8]
    assert what == "319 clips with a voice clustered into 2, 3, 4, 6, 8 pseudo-speakers"
    for grouping in groupings:
        assert grouping[5] is None
        for spk in range(8):  # coarser clusterings merge speakers; none cuts one in two
            assert len({grouping[i] for i in np.flatnonzero((g == spk) & present)}) == 1
    assert voice_groupings(emb[:30], present[:30], MIN_SPEAKER_CLIPS)[0] == []


def _two_voices(emotion: float, voice: float = 4.0):
    """Two speakers (`voice`: how far apart) with 400 clips each, each emotion a voice shift of
    `emotion`; half labelled."""
    rng = np.random.default_rng(3)
    spk, y = np.repeat([0, 1], 400), np.tile(np.arange(6), 134)[:800]
    v = (voice * rng.standard_normal((2, 32))[spk] + emotion * rng.standard_normal((6, 32))[y]
         + 0.6 * rng.standard_normal((800, 32)))
    return v.astype(np.float32), spk, [EMOTIONS[t] if i % 2 == 0 else None for i, t in enumerate(y)]


def test_a_clustering_that_follows_the_emotions_is_left_out_for_a_coarser_one(tmp_path):
    """A few speakers with hundreds of clips each: the size-based clusterings (5-20 clusters) cut
    each speaker by emotion, as their clusters' agreement with the labels shows; they are left
    out and the coarser clustering into the two voices is kept. Where even the coarsest follow
    the emotions, nothing is normalised, rather than the emotions."""
    v, spk, labels = _two_voices(0.5)
    groupings, what = voice_groupings(v, np.ones(800, bool), MIN_SPEAKER_CLIPS, labels)
    assert "clustered into 2 pseudo-speakers" in what and "5 clusters: AMI" in what and "cut by emotion" in what
    assert len(groupings) == 1
    assert all(len({groupings[0][i] for i in np.flatnonzero(spk == s)}) == 1 for s in (0, 1))  # each voice whole
    # without labels there is nothing to judge by: the size-based clusterings stay
    assert len(voice_groupings(v, np.ones(800, bool), MIN_SPEAKER_CLIPS)[0]) == 5
    # the emotions far apart, the voices close: the neighbour graph falls apart by emotion, so every
    # clustering, however its eigensolver splits the pieces on this CPU, is a union of emotions
    v, _, labels = _two_voices(3.0, voice=0.5)
    groupings, what = voice_groupings(v, np.ones(800, bool), MIN_SPEAKER_CLIPS, labels)
    assert groupings == [] and "clustered into no pseudo-speakers" in what and "2 clusters: AMI" in what
    clips = [Clip(name=f"c{i}", label=label) for i, label in enumerate(labels)]
    _voice_store(tmp_path / "speaker.h5", [c.name for c in clips], v, np.ones(800, bool))
    assert speaker_groupings(clips, "auto", tmp_path / "speaker.h5")[0] == []
    with pytest.raises(TrainError, match="cut by emotion"):
        speaker_groupings(clips, "on", tmp_path / "speaker.h5")


def _voice_store(path, names, emb, present):
    writer = StoreWriter(path, StoreIdentity(store="speaker", extractor="voice_encoder", params={}))
    for name, vec, here in zip(names, emb, present):
        writer.add(name, {"utterance": vec, "present": np.float32(here)})
    writer.finalize(list(names))


def test_unnamed_speakers_are_found_by_voice_and_normalised(tmp_path):
    """No clip names its speaker (the MER2025 layout): the voice store's clusters stand in, and
    the speaker shift goes as it does with named speakers."""
    clips, features, y = speakers(n_speakers=8, per_speaker=40)
    emb, g = voices()
    assert (g == np.array([int(c.group[3:]) for c in clips])).all()
    unnamed = [Clip(name=c.name, label=c.label, split=c.split) for c in clips]
    present = np.ones(len(clips), bool)
    _voice_store(tmp_path / "speaker.h5", [c.name for c in clips], emb, present)
    from pipeline.store import StoreReader  # noqa: F401 - the voice store reads back as written
    writer = StoreWriter(tmp_path / "voice.h5", StoreIdentity(store="voice", extractor="test", params={}))
    for c, vec in zip(clips, features.inputs["voice"]):
        writer.add(c.name, {"utterance": vec})
    writer.finalize([c.name for c in clips])
    groupings, kind, why = speaker_groupings(unnamed, "on", tmp_path / "speaker.h5")
    assert kind == "voice clusters" and len(groupings) == 5 and "320 clips with a voice" in why
    loaded = load_features(unnamed, ["voice"], tmp_path, speaker_norm="auto", voices=tmp_path / "speaker.h5")
    assert loaded.speaker_normalized and loaded.speaker_groups == "voice clusters"
    np.testing.assert_allclose(loaded.inputs["voice"],
                               normalize_by_groupings(features, groupings).inputs["voice"], rtol=1e-5)
    # what the speakers hid comes back: a linear model across speakers (grouped folds) gains
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.metrics import f1_score

    def f1(x):
        pred = cross_val_predict(LogisticRegression(max_iter=2000), x, y, groups=g, cv=GroupKFold(4))
        return f1_score(y, pred, average="weighted")

    assert f1(loaded.inputs["voice"]) > f1(features.inputs["voice"]) + 0.2
    # and the trainer's folds, with no group named, are grouped by the finest voice clustering
    assert loaded.fold_groups == groupings[-1]
    cfg = TrainConfig(stores=["voice"], model=FusionConfig(kind="single", single="voice", width=16), folds=4, epochs=3)
    result = cross_validate(unnamed, loaded, cfg)
    assert result.folds_grouped_by == "voice clusters" and not result.speaker_independent
    assert cross_validate(clips, loaded, cfg).folds_grouped_by == "named"
    with pytest.raises(FileNotFoundError, match="train.speaker_stores"):
        speaker_groupings(unnamed, "auto", tmp_path / "missing.h5")
    _voice_store(tmp_path / "few.h5", [c.name for c in clips], emb, np.arange(len(clips)) < 30)
    groupings, _, why = speaker_groupings(unnamed, "auto", tmp_path / "few.h5")
    assert not groupings and "30 clips with a voice" in why
    with pytest.raises(TrainError, match="too few"):
        speaker_groupings(unnamed, "on", tmp_path / "few.h5")


def test_each_speaker_is_centred_and_scaled_and_missing_rows_stay_missing():
    clips, features, _ = speakers(n_speakers=3, per_speaker=MIN_SPEAKER_CLIPS + 5)
    small = [Clip(name=f"s{i}", group="rare") for i in range(3)]  # a speaker seldom seen: overall statistics
    rng = np.random.default_rng(1)
    x = np.concatenate([features.inputs["voice"], 50 + rng.standard_normal((3, 16)).astype(np.float32)])
    mask = np.ones((len(x), 1), bool)
    mask[0] = False  # a clip without the modality
    x[0] = 0
    out = normalize_per_speaker(Features([c.name for c in clips + small], {"voice": x}, mask, ["voice"]),
                                [c.group for c in clips + small])
    assert out.speaker_normalized and out.inputs["voice"].dtype == np.float32
    v, groups = out.inputs["voice"], np.array([c.group for c in clips + small])
    for spk in ("spk0", "spk1", "spk2"):
        rows = (groups == spk) & mask[:, 0]
        np.testing.assert_allclose(v[rows].mean(axis=0), 0, atol=1e-5)
        np.testing.assert_allclose(v[rows].std(axis=0), 1, atol=1e-4)
    assert (v[0] == 0).all() and (out.mask == mask).all()
    present = mask[:, 0]
    overall = (x[-3:] - x[present].mean(axis=0)) / x[present].std(axis=0)
    np.testing.assert_allclose(v[-3:], overall, rtol=1e-4)


def test_speaker_normalisation_recovers_the_emotion_speakers_hide():
    clips, features, y = speakers()
    from sklearn.metrics import f1_score

    cfg = TrainConfig(stores=["voice"], model=FusionConfig(kind="single", single="voice", width=32),
                      folds=3, epochs=20, lr=3e-3)
    plain = cross_validate(clips, features, cfg)
    normed = cross_validate(clips, normalize_per_speaker(features, [c.group for c in clips]), cfg)
    f1_plain = f1_score(y, plain.oof_probs.argmax(1), average="weighted")
    f1_normed = f1_score(y, normed.oof_probs.argmax(1), average="weighted")
    assert normed.speaker_normalized and not plain.speaker_normalized
    assert f1_normed > 0.9 and f1_normed > f1_plain + 0.2, (f1_plain, f1_normed)


def test_candidates_name_their_speaker_in_the_candidate_file(tmp_path):
    root = build_dataset(tmp_path / "ds", {"a1": "happy", "a2": "sad"}, ["b1", "b2"], video=False)
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete", "valence", "group"],
              [["a1", "happy", "", "actor_01"], ["a2", "sad", "", "actor_01"]])
    write_csv(root / "track_all_candidates.csv", ["name", "group"], [["b1", "actor_09"], ["b2", ""]])
    groups = {c.name: c.group for c in ingest(IngestConfig(root=str(root)))}
    assert groups == {"a1": "actor_01", "a2": "actor_01", "b1": "actor_09", "b2": None}


def test_predict_needs_one_speakers_clips_for_speaker_normalised_models(tmp_path):
    from test_predict import trained as _trained  # noqa: F401 - the fixture's body, called below

    from pipeline.fusion.predict import run_predict

    params, models = _trained.__wrapped__(tmp_path)
    for path in models.glob("fold*.pt"):
        ckpt = torch.load(path, weights_only=True)
        ckpt["speaker_norm"] = True
        torch.save(ckpt, path)
    from fixtures_media import write_clip

    clips = [write_clip(tmp_path / f"new{i}.mp4", seconds=0.4, tone_hz=200.0 + 20 * i)
             for i in range(MIN_SPEAKER_CLIPS)]
    with pytest.raises(MerError, match="at least 20 clips of one speaker at once, with --same-speaker"):
        run_predict(clips, params, models, english="hi")
    with pytest.raises(MerError, match=r"given: 3 clip\(s\)\)"):
        run_predict(clips[:3], params, models, english="hi", same_speaker=True)
    results = run_predict(clips, params, models, english="hi", same_speaker=True)
    assert len(results) == MIN_SPEAKER_CLIPS
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-3 for r in results)


def test_clips_without_a_group_get_the_overall_statistics_not_their_own():
    """Clips with no voice to cluster (None) are not one big speaker, however many there are."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 4)).astype(np.float32) + np.repeat([[0.0], [5.0]], 30, axis=0)
    groups = ["spk"] * 30 + [None] * 30
    out = normalize_per_speaker(Features([f"c{i}" for i in range(60)], {"s": x}, np.ones((60, 1), bool), ["s"]),
                                groups).inputs["s"]
    np.testing.assert_allclose(out[:30].mean(axis=0), 0, atol=1e-5)  # the named speaker: its own mean
    np.testing.assert_allclose(out[30:], (x[30:] - x.mean(axis=0)) / x.std(axis=0), rtol=1e-4)
