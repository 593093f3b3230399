"""`make bench-heldout`'s corpus split: by speaker, labels of the candidates kept outside the root."""

import csv

from pipeline.bench.heldout import score, split_items, write_heldout
from pipeline.data.convert import Item
from pipeline.data.ingest import ingest
from pipeline.config import IngestConfig


def _rows(path):
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_ravdess_split_by_actor_keeps_candidate_labels_out_of_the_root(tmp_path):
    items = [Item(name=f"a{actor:02d}_{i}", label=["happy", "sad"][i % 2], group=f"actor_{actor:02d}",
                  english="Kids are talking by the door.") for actor in range(1, 13) for i in range(4)]
    labelled, cands = split_items("ravdess", items, 0)
    assert {i.group for i in labelled} == {f"actor_{a:02d}" for a in range(1, 9)}
    assert {i.group for i in cands} == {f"actor_{a:02d}" for a in range(9, 13)}
    root, truth = tmp_path / "dataset", tmp_path / "truth.csv"
    write_heldout(labelled, cands, root, truth)
    assert not truth.is_relative_to(root)
    assert {r["name"] for r in _rows(root / "track1_train_disdim.csv")} == {i.name for i in labelled}
    assert "discrete" not in _rows(root / "track_all_candidates.csv")[0]
    assert {r["name"]: r["discrete"] for r in _rows(truth)} == {i.name: i.label for i in cands}
    clips = ingest(IngestConfig(root=str(root)))
    assert sum(bool(c.label) for c in clips) == 32 and sum(c.candidate for c in clips) == 16
    assert not any(c.label for c in clips if c.candidate)  # the pipeline never sees a candidate's label


def test_meld_split_keeps_whole_dialogues_and_scores_missing_as_wrong():
    items = [Item(name=f"{split}_dia{d}_utt{u}", label="neutral", group=f"{split}_dia{d}", english="hi")
             for split, n in (("train", 20), ("dev", 5)) for d in range(n) for u in range(3)]
    labelled, cands = split_items("meld", items, 10)
    assert 10 <= len(labelled) < 20 and len(labelled) % 3 == 0  # whole dialogues, seeded sample
    assert {i.group.split("_")[0] for i in cands} == {"dev"} and len(cands) == 15
    truth = {"a": "happy", "b": "sad"}
    assert score({"a": "happy"}, truth, 1) == {"weighted_f1": 0.5, "accuracy": 0.5, "coverage": 0.5, "candidates": 2}


def test_store_rows_score_each_store_plain_and_speaker_normalised_and_the_zero_shot_labels(tmp_path):
    """A voice store where each speaker shifts every vector: the speaker-normalised LR row finds the
    emotions the plain one misses; a candidate a store lacks gets the majority class, outside coverage."""
    import numpy as np
    from test_refine import _write_store

    from pipeline.bench.heldout import store_rows
    from pipeline.labels import EMOTIONS
    from pipeline.manifest import Clip, write_manifest

    rng = np.random.default_rng(0)
    spk = np.repeat(np.arange(8), 24)
    y = np.tile(np.arange(6), 32)
    clips = [Clip(name=f"c{i:03d}", label=EMOTIONS[y[i]] if spk[i] < 6 else None, group=f"spk{spk[i]}",
                  candidate=bool(spk[i] >= 6)) for i in range(len(y))]
    write_manifest(clips, tmp_path / "data" / "manifest.jsonl")
    voice = (rng.standard_normal((6, 16))[y] + 6 * rng.standard_normal((8, 16))[spk]
             + 0.5 * rng.standard_normal((len(y), 16)))
    _write_store(tmp_path / "features" / "voice.h5", "voice", {c.name: v for c, v in zip(clips, voice)})
    llm = {c.name: np.eye(6)[t] for c, t in zip(clips[:-4], y[:-4])}  # the last 4 candidates absent
    _write_store(tmp_path / "features" / "llm_labels.h5", "llm_labels", llm)
    truth = {c.name: c.label or EMOTIONS[y[i]] for i, c in enumerate(clips) if c.candidate}
    rows = {r["row"]: r for r in store_rows(tmp_path, truth)}
    assert list(rows) == ["llm_labels (zero-shot)", "voice + LR", "voice + LR, speaker-normalised (named)"]
    assert rows["llm_labels (zero-shot)"]["coverage"] == round(44 / 48, 4)
    # the 4 absent get the majority class (neutral), wrong for each of them
    assert rows["llm_labels (zero-shot)"]["accuracy"] == round(44 / 48, 4)
    assert rows["voice + LR, speaker-normalised (named)"]["weighted_f1"] > 0.9
    assert rows["voice + LR, speaker-normalised (named)"]["weighted_f1"] > rows["voice + LR"]["weighted_f1"] + 0.2
    assert all(r["candidates"] == 48 and r["coverage"] in (1.0, round(44 / 48, 4)) for r in rows.values())


def test_real_bench_takes_its_stores_and_trainer_from_params(tmp_path, monkeypatch):
    """`make bench`: the stores are params.yaml's (Whisper's middle blocks, not a copy of older
    settings; MELD's text in English), each store gets a plain and a per-speaker-normalised LR
    row, and the fusion rows train params' train section, the default kind first."""
    from dataclasses import replace
    from pathlib import Path

    import numpy as np
    from test_refine import _write_store

    from pipeline.bench import real
    from pipeline.config import load_params
    from pipeline.fusion import train as train_module
    from pipeline.labels import EMOTIONS
    from pipeline.manifest import Clip

    repo = Path(__file__).resolve().parents[1]
    params = load_params(repo / "params.yaml")
    ravdess, meld = real.corpora(params)
    assert ravdess.stores == {"prosody": params.extract["prosody"], "whisper": params.extract["whisper"]}
    assert meld.stores["text"].options == {**params.extract["text"].options, "language": "english"}
    whisper = ravdess.stores["whisper"]  # a changed setting is a new store file, not a fingerprint stop
    assert real.store_path(tmp_path, "whisper", whisper) == real.store_path(tmp_path, "whisper", replace(whisper))
    assert real.store_path(tmp_path, "whisper", whisper) != real.store_path(
        tmp_path, "whisper", replace(whisper, options={**whisper.options, "layers": [5]}))

    rng = np.random.default_rng(0)
    spk, y = np.repeat(np.arange(5), 24), np.tile(np.arange(6), 20)
    clips = [Clip(name=f"c{i:03d}", label=EMOTIONS[y[i]], group=f"spk{spk[i]}") for i in range(len(y))]
    x = rng.standard_normal((6, 16))[y] + 6 * rng.standard_normal((5, 16))[spk] + 0.5 * rng.standard_normal((len(y), 16))
    rows = real.store_rows(ravdess, "a", ravdess.stores["whisper"], x, clips)
    assert [r["modality"] for r in rows] == ["a (whisper_encoder)", "a (whisper_encoder), normalised per speaker (named)"]
    assert rows[1]["weighted_f1"] > rows[0]["weighted_f1"] + 0.2 and rows[1]["n"] == 120

    for store, values in (("a", x), ("b", rng.standard_normal((len(y), 4)))):
        _write_store(tmp_path / f"{store}.h5", store, {c.name: v for c, v in zip(clips, values)})
    seen = []
    real_cv = train_module.cross_validate
    monkeypatch.setattr(train_module, "cross_validate", lambda c, f, cfg, **kw: seen.append((cfg, f)) or real_cv(c, f, cfg, **kw))
    fast = replace(params, train=replace(params.train, epochs=2, self_training_min_clips=0))
    rows = real.fusion_rows(ravdess, clips, ["a", "b"], tmp_path, fast)
    assert [r["modality"] for r in rows] == ["fusion ecmf, the default (a + b)", "fusion mer_baseline (a + b)",
                                             "fusion concat (a + b)"]
    assert all(0 < r["weighted_f1"] <= 1 and r["n"] == 120 for r in rows)
    assert rows[0]["weighted_f1"] > 0.8  # speaker-normalised, as params' speaker_norm auto does on named speakers
    cfg, features = seen[0]
    assert features.speaker_normalized and cfg == replace(fast.train, stores=["a", "b"])
    rows = real.fusion_rows(meld, clips, ["b"], tmp_path, fast)  # one store: the default trains as single, alone
    assert [r["modality"] for r in rows] == ["fusion ecmf, trains as single, the default (b)"]
