"""Speaker normalisation (train.speaker_norm): when it applies, what it does to the stores, and
that it removes who-speaks from what the classifier reads."""

import numpy as np
import pytest
import torch
from conftest import build_dataset, write_csv

from pipeline.config import FusionConfig, IngestConfig, TrainConfig
from pipeline.data.ingest import ingest
from pipeline.errors import MerError, TrainError
from pipeline.fusion.features import MIN_SPEAKER_CLIPS, Features, normalize_per_speaker, speaker_norm_applies
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
    assert speaker_norm_applies(clips, "auto")[0]
    assert speaker_norm_applies(clips, "on")[0]
    assert not speaker_norm_applies(clips, "off")[0]
    dialogues = [Clip(name=f"d{i}", group=f"dia{i // 9}") for i in range(90)]  # MELD: ~9 utterances each
    applies, why = speaker_norm_applies(dialogues, "auto")
    assert not applies and "median of 9 clips" in why
    unnamed = clips[:-1] + [Clip(name="x")]
    applies, why = speaker_norm_applies(unnamed, "auto")
    assert not applies and "1 of 360 clips name no group" in why and "x" in why
    with pytest.raises(TrainError, match="train.speaker_norm' is on, but 1 of 360 clips name no group"):
        speaker_norm_applies(unnamed, "on")


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
