"""Label refinement: weak estimators, cross-fitting, both aggregators, thresholds, the stage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.neighbors import KNeighborsClassifier
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.config import ConfigError, DawidSkeneConfig, from_dict
from pipeline.labels import EMOTION_INDEX, EMOTIONS
from pipeline.manifest import Clip, write_manifest
from pipeline.refine.vote import RefineConfig, Votes, aggregate, decide, write_outputs
from pipeline.stages.refine import main as refine_stage
from pipeline.store import StoreIdentity, StoreWriter
from pipeline.refine.weak import (CompleteClassifier, LightGBMConfig, LogRegConfig, cross_fit, dawid_skene,
                           dawid_skene_crowdkit,
                           lightgbm, logreg, make_weak, weighted_vote)

W, S = EMOTION_INDEX["worried"], EMOTION_INDEX["sad"]


@parametrize_with_checks([CompleteClassifier(logreg(LogRegConfig(), 0)),
                          CompleteClassifier(lightgbm(LightGBMConfig(n_estimators=20), 0))])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_missing_classes_still_give_six_columns_in_emotions_order():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = np.array(["sad", "happy"] * 20)
    X[y == "sad"] += 3
    for name in ("logreg", "lightgbm"):
        model = make_weak(name, EMOTIONS, seed=0).fit(X, y)
        proba = model.predict_proba(X)
        assert list(model.classes_) == list(EMOTIONS) and proba.shape == (40, 6)
        assert np.allclose(proba.sum(axis=1), 1)
        assert np.all(proba[:, [0, 1, 4, 5]] == 0)
        assert (model.predict(X) == y).mean() > 0.9
    single = make_weak("logreg", EMOTIONS, seed=0).fit(X[:5], ["angry"] * 5)
    assert np.array_equal(single.predict_proba(X[:2]), np.tile(np.eye(6)[1], (2, 1)))
    with pytest.raises(ValueError, match="not among classes"):
        make_weak("logreg", EMOTIONS, seed=0).fit(X[:4], ["calm", "sad", "sad", "calm"])


class SpyClassifier(ClassifierMixin, BaseEstimator):
    """Column 0 of X is a clip id; predicting a clip it was fitted on fails the test."""

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.seen_ = set(X[:, 0].astype(int))
        return self

    def predict_proba(self, X):
        leaked = self.seen_ & set(X[:, 0].astype(int))
        assert not leaked, f"clips {sorted(leaked)[:5]} scored by a model that saw them"
        return np.full((len(X), len(self.classes_)), 1.0 / len(self.classes_))


def _random_labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % 6)


def test_cross_fit_never_scores_a_clip_with_a_model_that_saw_it():
    n = 120
    ids = np.arange(n, dtype=float)[:, None]
    gold = _random_labels(n)
    gold[100:] = -1  # unlabelled: scored by every fold model, seen by none
    groups = [f"g{i // 4}" for i in range(n)]
    mask = np.ones(n, bool)
    mask[::10] = False  # absent from the store: no vote
    probs, scored = cross_fit(CompleteClassifier(SpyClassifier(), EMOTIONS), ids, mask, gold, groups, 5, 0)
    assert np.array_equal(scored, mask)
    assert np.allclose(probs[mask].sum(axis=1), 1) and np.all(probs[~mask] == 0)


def test_memorising_1nn_is_perfect_in_sample_but_chance_out_of_fold():
    n = 600
    ids = np.arange(n, dtype=float)[:, None]  # a unique id per clip: pure memorisation
    gold = _random_labels(n, seed=1)
    model = CompleteClassifier(KNeighborsClassifier(n_neighbors=1), EMOTIONS)
    assert (model.fit(ids, np.array(EMOTIONS)[gold]).predict(ids) == np.array(EMOTIONS)[gold]).all()
    probs, _ = cross_fit(model, ids, np.ones(n, bool), gold, [None] * n, 5, 0)
    accuracy = (probs.argmax(axis=1) == gold).mean()
    assert accuracy < 0.3  # chance is 1/6


def _biased_votes(n_per_class: int = 100, seed: int = 0) -> tuple[Votes, np.ndarray]:
    """Source A: right 90% (p 0.7). Source B: right (p 0.8) except worried -> says sad."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(6), n_per_class)
    a_says = np.where(rng.random(len(truth)) < 0.9, truth, rng.integers(0, 6, len(truth)))
    b_says = np.where(truth == W, S, truth)
    probs = np.stack([_peaked(a_says, 0.7), _peaked(b_says, 0.8)])
    votes = Votes(["a/logreg", "b/logreg"], ["a", "b"], probs, np.ones((2, len(truth)), bool))
    return votes, truth


def _peaked(says: np.ndarray, top: float) -> np.ndarray:
    p = np.full((len(says), 6), (1 - top) / 5)
    p[np.arange(len(says)), says] = top
    return p


def _clips(gold: np.ndarray) -> list[Clip]:
    return [Clip(name=f"c{i:04d}", label=EMOTIONS[g] if g >= 0 else None,
                 split="labelled" if g >= 0 else "unlabelled", group=f"g{i % 7}")
            for i, g in enumerate(gold)]


@pytest.mark.parametrize("method", ["weighted_vote", "dawid_skene", "crowdkit"])
def test_aggregate_learns_to_distrust_a_source_on_one_class(method):
    votes, truth = _biased_votes()
    # extra unlabelled worried clips where A says worried and B (wrongly) says sad
    probs = np.concatenate([votes.probs, np.stack([_peaked(np.full(30, W), 0.7),
                                                   _peaked(np.full(30, S), 0.8)])], axis=1)
    votes = Votes(votes.sources, votes.stores, probs, np.ones(probs.shape[:2], bool))
    gold = np.concatenate([truth, np.full(30, -1)])
    unweighted = weighted_vote(votes.probs, votes.present, np.ones((2, 6)))
    assert (unweighted[-30:].argmax(axis=1) == S).all()  # a plain vote believes B
    cfg = RefineConfig(method=method, pseudo_threshold=0.4, min_agreeing_sources=1) if method != "crowdkit" else \
        RefineConfig(method="dawid_skene", dawid_skene=DawidSkeneConfig(implementation="crowdkit"),
                     pseudo_threshold=0.4, min_agreeing_sources=1)
    agg, reliability = aggregate(votes, gold, cfg)
    assert (agg[-30:].argmax(axis=1) == W).all()
    assert reliability[1, S] < 0.6 < reliability[0, S] and reliability[1, S] < reliability[1, 0]
    result = decide(_clips(gold), votes, agg, reliability, cfg)
    assert result.pseudo[-30:].all() and (result.refined[-30:] == W).all()


@pytest.mark.parametrize("em", [dawid_skene, dawid_skene_crowdkit])
def test_dawid_skene_confusion_finds_the_swap_and_leaves_gold_out_of_the_posterior(em):
    votes, truth = _biased_votes()
    noisy, wrong = truth.copy(), np.flatnonzero(truth == W)[:10]
    noisy[wrong] = S  # gold says sad where the truth is worried, as source B does
    posterior, confusion, _ = em(votes.probs, votes.present, noisy)
    assert confusion[1, W, S] > 0.85 and confusion[0, W, W] > 0.8
    assert (posterior.argmax(axis=1) == truth).mean() > 0.85  # from the votes, not from gold
    assert (posterior[wrong].argmax(axis=1) == W).mean() >= 0.7  # A itself errs 10% of the time


def _noisy_setup(seed: int = 3) -> tuple[list[Clip], Votes, np.ndarray, np.ndarray]:
    """Two good sources from two stores; 15% of gold flipped; 60 unlabelled clips."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(6), 50)
    gold = truth.copy()
    flip = rng.random(len(truth)) < 0.15
    gold[flip] = (truth[flip] + rng.integers(1, 6, flip.sum())) % 6
    gold = np.concatenate([gold, np.full(60, -1)])
    truth = np.concatenate([truth, rng.integers(0, 6, 60)])
    probs = []
    for _ in range(2):
        logits = rng.normal(size=(len(truth), 6)) + 2.5 * np.eye(6)[truth]
        probs.append(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    votes = Votes(["x/logreg", "y/logreg"], ["x", "y"], np.stack(probs), np.ones((2, len(truth)), bool))
    return _clips(gold), votes, gold, truth


@pytest.mark.parametrize("method", ["weighted_vote", "dawid_skene"])
def test_higher_correct_threshold_changes_fewer_labels(method):
    clips, votes, gold, truth = _noisy_setup()
    counts = []
    for threshold in (0.3, 0.6, 0.9):
        cfg = RefineConfig(method=method, correct_threshold=threshold)
        agg, rel = aggregate(votes, gold, cfg)
        result = decide(clips, votes, agg, rel, cfg)
        counts.append(int(result.changed.sum()))
        assert not result.changed[gold < 0].any() and not result.pseudo[gold >= 0].any()
        fixed = result.changed & (result.refined == truth)
        assert fixed.sum() >= 0.5 * result.changed.sum()  # most changes restore the truth
    assert counts[0] > counts[1] >= counts[2] and counts[0] > 0


def test_per_class_pseudo_thresholds_and_min_agreeing_sources():
    clips, votes, gold, _ = _noisy_setup()
    cfg = RefineConfig(pseudo_threshold=1.0, pseudo_thresholds={"worried": 0.0}, min_agreeing_sources=0)
    agg, rel = aggregate(votes, gold, cfg)
    result = decide(clips, votes, agg, rel, cfg)
    assert result.pseudo.any() and set(result.refined[result.pseudo]) == {W}
    assert result.pseudo.sum() == ((gold < 0) & (agg.argmax(axis=1) == W)).sum()

    loose = RefineConfig(pseudo_threshold=0.0, min_agreeing_sources=0)
    n_all = decide(clips, votes, agg, rel, loose).pseudo.sum()
    assert n_all == (gold < 0).sum()
    both = decide(clips, votes, agg, rel, RefineConfig(pseudo_threshold=0.0, min_agreeing_sources=2))
    top = agg.argmax(axis=1)
    agree = (votes.probs.argmax(axis=2) == top).all(axis=0)
    assert np.array_equal(both.pseudo, (gold < 0) & agree) and both.pseudo.sum() < n_all
    # the same two sources as one store (logreg + lightgbm on the same features) count once
    same = Votes(votes.sources, ["x", "x"], votes.probs, votes.present)
    assert not decide(clips, same, agg, rel, RefineConfig(pseudo_threshold=0.0)).pseudo.any()


def test_soft_mode_keeps_gold_and_shares_its_mass():
    clips, votes, gold, _ = _noisy_setup()
    hard_cfg, soft_cfg = RefineConfig(correct_threshold=0.5), RefineConfig(correct_threshold=0.5, mode="soft")
    agg, rel = aggregate(votes, gold, hard_cfg)
    hard, soft = decide(clips, votes, agg, rel, hard_cfg), decide(clips, votes, agg, rel, soft_cfg)
    assert np.array_equal(hard.changed, soft.changed) and soft.changed.any()
    assert np.array_equal(soft.refined[gold >= 0], gold[gold >= 0])
    i = np.flatnonzero(soft.changed)[0]
    assert np.allclose(soft.soft[i], (np.eye(6)[gold[i]] + agg[i]) / 2)
    assert hard.refined[i] == agg[i].argmax() and hard.soft[i].max() == 1.0


def test_cleanlab_finds_flipped_labels_with_its_own_thresholds():
    """refine.method cleanlab: confident learning flags the labels the sources disagree with, per
    class, with no correct_threshold; it finds most of the 15% flips, mostly flips."""
    clips, votes, gold, truth = _noisy_setup()
    cfg = RefineConfig(method="cleanlab", correct_threshold=1.0)  # the threshold plays no part
    agg, rel = aggregate(votes, gold, cfg)
    np.testing.assert_allclose(agg, aggregate(votes, gold, RefineConfig())[0])  # the weighted_vote mixture
    result = decide(clips, votes, agg, rel, cfg)
    flipped = (gold >= 0) & (gold != truth)
    found = result.changed & flipped
    assert found.sum() >= 0.7 * flipped.sum() and found.sum() >= 0.7 * result.changed.sum()
    assert (result.refined[found] == truth[found]).mean() > 0.8 and not result.changed[gold < 0].any()
    both = from_dict(RefineConfig, {"method": "cleanlab", "cleanlab": {"filter_by": "both"}}, "refine")
    strict = decide(clips, votes, agg, rel, both)
    assert strict.changed.sum() <= result.changed.sum()


def test_drop_mode_leaves_flagged_clips_out_of_training_only(tmp_path: Path):
    clips, votes, gold, _ = _noisy_setup()
    hard_cfg, drop_cfg = RefineConfig(correct_threshold=0.5), RefineConfig(correct_threshold=0.5, mode="drop")
    agg, rel = aggregate(votes, gold, hard_cfg)
    hard, drop = decide(clips, votes, agg, rel, hard_cfg), decide(clips, votes, agg, rel, drop_cfg)
    assert np.array_equal(hard.changed, drop.dropped) and not drop.changed.any() and drop.dropped.any()
    assert np.array_equal(drop.refined[gold >= 0], gold[gold >= 0])  # gold stays the clip's label
    assert (drop.soft[drop.dropped] == 0).all() and (drop.soft[(gold >= 0) & ~drop.dropped].sum(axis=1) == 1).all()
    summary = write_outputs(drop, drop_cfg, tmp_path / "labels.jsonl", tmp_path / "summary.json")
    assert summary["dropped"] == int(drop.dropped.sum()) and summary["changed"] == 0
    from pipeline.stages.train import read_refined

    refined, _ = read_refined(tmp_path / "labels.jsonl")
    i = int(np.flatnonzero(drop.dropped)[0])
    assert not refined[clips[i].name].any()  # the trainer's mark for "not a training row"


def test_output_files(tmp_path: Path):
    clips, votes, gold, _ = _noisy_setup()
    votes.present[1, :5] = False  # y has no vote on the first five clips
    cfg = RefineConfig(correct_threshold=0.5, pseudo_threshold=0.5)
    agg, rel = aggregate(votes, gold, cfg)
    result = decide(clips, votes, agg, rel, cfg)
    summary = write_outputs(result, cfg, tmp_path / "labels.jsonl", tmp_path / "summary.json")
    rows = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == [c.name for c in clips]
    assert set(rows[0]) == {"name", "split", "label", "refined", "soft", "aggregate", "confidence",
                            "changed", "pseudo", "dropped", "votes"}
    assert set(rows[0]["votes"]) == {"x/logreg"} and set(rows[9]["votes"]) == {"x/logreg", "y/logreg"}
    changed = [r for r in rows if r["changed"]]
    assert len(changed) == summary["changed"] > 0
    assert all(r["refined"] != r["label"] and r["confidence"] > 0.5 for r in changed)
    pseudo = [r for r in rows if r["pseudo"]]
    assert all(r["label"] is None and r["refined"] in EMOTIONS and len(r["soft"]) == 6 for r in pseudo)
    assert all(r["refined"] is None and r["soft"] is None for r in rows if r["label"] is None and not r["pseudo"])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert sum(summary["pseudo_per_class"].values()) == summary["pseudo"] == len(pseudo)
    assert sum(summary["changed_from"].values()) == summary["changed"]
    assert set(summary["sources"]["x/logreg"]["reliability"]) == set(EMOTIONS)


def test_config_is_strict():
    cfg = from_dict(RefineConfig, {"stores": ["a"], "k": 3, "pseudo_thresholds": {"surprise": 0.5}}, "refine")
    assert cfg.threshold("surprise") == 0.5 and cfg.threshold("sad") == cfg.pseudo_threshold
    for bad, key in [({"methd": "x"}, "refine.methd"), ({"method": "majority"}, "refine.method"),
                     ({"pseudo_thresholds": {"fear": 0.5}}, "refine.pseudo_thresholds"),
                     ({"classifiers": ["svm"]}, "refine.classifiers"), ({"k": "5"}, "refine.k"),
                     ({"lightgbm": {"trees": 5}}, "refine.lightgbm.trees")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            from_dict(RefineConfig, bad, "refine")


def _write_store(path: Path, store: str, vectors: dict[str, np.ndarray]) -> None:
    writer = StoreWriter(path, StoreIdentity(store=store, extractor="test", params={}))
    for name, vec in vectors.items():
        writer.add(name, {"utterance": vec.astype(np.float32)})
    writer.finalize(list(vectors))


def _tiny_project(tmp_path: Path) -> tuple[Path, list[Clip]]:
    rng = np.random.default_rng(0)
    truth = np.concatenate([np.repeat(np.arange(6), 8), rng.integers(0, 6, 12)])
    gold = truth.copy()
    gold[:48:8] = (gold[:48:8] + 1) % 6  # one wrong gold label per class
    gold[48:] = -1
    clips = _clips(gold)
    write_manifest(clips, tmp_path / "manifest.jsonl")
    features = {c.name: rng.normal(size=8) + 4 * np.eye(8)[t] for c, t in zip(clips, truth)}
    _write_store(tmp_path / "features" / "feat.h5", "feat", features)
    llm = {c.name: np.eye(6)[t] * 0.7 + 0.05 for c, t in zip(clips[5:], truth[5:])}  # 5 clips absent
    _write_store(tmp_path / "features" / "llm_labels.h5", "llm_labels", llm)
    return tmp_path, clips


def test_stage_runs_over_tiny_stores(tmp_path: Path, capsys):
    root, clips = _tiny_project(tmp_path)
    refine = {"stores": ["feat"], "label_stores": ["llm_labels"], "k": 3, "correct_threshold": 0.6,
              "pseudo_threshold": 0.5, "lightgbm": {"n_estimators": 20, "min_child_samples": 3}}
    (root / "params.yaml").write_text(yaml.safe_dump({"refine": refine}))
    out = root / "reports" / "refine"
    refine_stage([str(root / "manifest.jsonl"), str(out / "labels.jsonl"), str(out / "summary.json"),
                  "--features", str(root / "features"), "--params", str(root / "params.yaml")])
    assert "labels changed and" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == len(clips) and summary["labelled"] == 48 and summary["unlabelled"] == 12
    assert set(summary["sources"]) == {"feat/logreg", "feat/lightgbm", "llm_labels"}
    assert "llm_labels" not in rows[0]["votes"] and "llm_labels" in rows[5]["votes"]
    restored = [r for r in rows[:48:8] if r["changed"]]
    assert restored and all(r["refined"] != r["label"] for r in restored)
    assert summary["pseudo"] > 0


def test_a_non_finite_row_is_a_missing_vote_not_a_traceback(tmp_path: Path, caplog):
    """A NaN in one clip of a feature store or a label store: that clip has no vote from it (as the
    trainer reads it); scikit-learn stopped the stage with `Input X contains NaN`."""
    root, clips = _tiny_project(tmp_path)
    rng = np.random.default_rng(1)
    vectors = {c.name: rng.normal(size=8) for c in clips}
    vectors[clips[3].name][2] = np.nan
    for store in ("feat", "llm_labels"):  # written again, with the broken rows
        (root / "features" / f"{store}.h5").unlink()
    _write_store(root / "features" / "feat.h5", "feat", vectors)
    llm = {c.name: np.eye(6)[EMOTION_INDEX[c.label]] * 0.7 + 0.05 if c.label else np.full(6, 1 / 6) for c in clips}
    llm[clips[7].name][0] = np.inf
    _write_store(root / "features" / "llm_labels.h5", "llm_labels", llm)
    (root / "params.yaml").write_text(yaml.safe_dump({"refine": {"stores": ["feat"], "label_stores": ["llm_labels"],
                                                                 "k": 3, "lightgbm": {"n_estimators": 5}}}))
    out = root / "reports" / "refine"
    with caplog.at_level("WARNING"):
        refine_stage([str(root / "manifest.jsonl"), str(out / "labels.jsonl"), str(out / "summary.json"),
                      "--features", str(root / "features"), "--params", str(root / "params.yaml")])
    rows = {r["name"]: r for r in map(json.loads, (out / "labels.jsonl").read_text().splitlines())}
    assert "feat/logreg" not in rows[clips[3].name]["votes"] and "feat/logreg" in rows[clips[4].name]["votes"]
    assert "llm_labels" not in rows[clips[7].name]["votes"] and "llm_labels" in rows[clips[8].name]["votes"]
    assert sum("1 clips with non-finite values are treated as missing" in r.getMessage() for r in caplog.records) == 2
    assert "NaN" not in (out / "labels.jsonl").read_text() + (out / "summary.json").read_text()


def test_stage_names_the_params_key_of_a_missing_store(tmp_path: Path, capsys):
    root, _ = _tiny_project(tmp_path)
    (root / "params.yaml").write_text(yaml.safe_dump({"refine": {"stores": ["feat", "whisper"]}}))
    with pytest.raises(SystemExit):
        refine_stage([str(root / "manifest.jsonl"), str(root / "l.jsonl"), str(root / "s.json"),
                      "--features", str(root / "features"), "--params", str(root / "params.yaml")])
    err = capsys.readouterr().err
    assert "refine.stores" in err and "whisper.h5" in err and "Traceback" not in err


def test_stage_still_writes_outputs_when_too_few_labelled_clips_for_k(tmp_path: Path):
    root, clips = _tiny_project(tmp_path)
    (root / "params.yaml").write_text(yaml.safe_dump({"refine": {"stores": ["feat"], "k": 60}}))
    out = root / "out"
    refine_stage([str(root / "manifest.jsonl"), str(out / "labels.jsonl"), str(out / "summary.json"),
                  "--features", str(root / "features"), "--params", str(root / "params.yaml")])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["skipped_sources"]) == {"feat/logreg", "feat/lightgbm"}
    assert "refine.k = 60" in summary["skipped_sources"]["feat/logreg"]
    assert summary["changed"] == summary["pseudo"] == 0 and summary["without_votes"] == len(clips)
    rows = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert all(r["votes"] == {} and r["confidence"] is None for r in rows)
    assert [r["refined"] for r in rows] == [c.label for c in clips]


def test_a_source_no_better_than_the_majority_class_gets_no_weight(tmp_path: Path):
    """An LLM that says 'angry' to everything is dropped, named in the summary with its score."""
    from pipeline.refine.vote import drop_unreliable

    clips, votes, gold, _ = _noisy_setup()
    constant = _peaked(np.full(votes.probs.shape[1], EMOTION_INDEX["angry"]), 0.9)
    votes = Votes(votes.sources + ["llm_labels"], votes.stores + ["llm_labels"],
                  np.concatenate([votes.probs, constant[None]]), np.ones((3, votes.probs.shape[1]), bool))
    kept = drop_unreliable(votes, gold)
    assert kept.sources == ["x/logreg", "y/logreg"] and kept.probs.shape[0] == 2
    assert kept.skipped["llm_labels"].startswith("below the majority class")
    cfg = RefineConfig()
    agg, rel = aggregate(kept, gold, cfg)
    summary = write_outputs(decide(clips, kept, agg, rel, cfg), cfg, tmp_path / "l.jsonl", tmp_path / "s.json")
    assert "llm_labels" in summary["skipped_sources"] and "llm_labels" not in summary["sources"]


def test_fold_refiner_never_sees_the_labels_it_will_be_scored_on(tmp_path: Path):
    """train.refine_in_folds: an outer fold's training targets come from refine rerun with the
    scored clips' labels withheld, so changing those labels changes nothing."""
    from dataclasses import replace

    from pipeline.config import Params
    from pipeline.stages.train import fold_refiner

    root, clips = _tiny_project(tmp_path)
    params = from_dict(Params, {"refine": {"stores": ["feat"], "label_stores": [], "k": 3, "method": "cleanlab",
                                          "mode": "hard", "lightgbm": {"n_estimators": 20, "min_child_samples": 3}}})
    hidden = {c.name for c in clips[:48:3]}
    refined, pseudo = fold_refiner(clips, params, root / "features")(hidden)
    assert refined and not hidden & (set(refined) | set(pseudo))
    assert set(refined) == {c.name for c in clips[:48]} - hidden  # every visible labelled clip, no other
    scrambled = [replace(c, label=EMOTIONS[(EMOTIONS.index(c.label) + 2) % 6]) if c.name in hidden else c
                 for c in clips]
    again, again_pseudo = fold_refiner(scrambled, params, root / "features")(hidden)
    assert again.keys() == refined.keys() and again_pseudo.keys() == pseudo.keys()
    assert all(np.array_equal(again[n], refined[n]) for n in refined)
    full, _ = fold_refiner(clips, params, root / "features")(set())
    assert any(not np.array_equal(full[n], refined[n]) for n in refined)  # withholding labels does change it


def test_crowdkit_em_keeps_smoothing_where_a_class_is_never_voted():
    """crowd-kit smooths only its first M-step; ours keeps `smoothing` counts in the final
    confusions, so a class no source votes (surprise here) vetoes nothing, and both EMs agree."""
    rng = np.random.default_rng(1)
    truth = np.repeat(np.arange(6), 60)
    says = np.where(truth == 5, 4, truth)  # no source ever says surprise
    a = np.where(rng.random(len(truth)) < 0.85, says, rng.integers(0, 5, len(truth)))
    b = np.where(rng.random(len(truth)) < 0.85, says, rng.integers(0, 5, len(truth)))
    probs = np.stack([_peaked(a, 0.7), _peaked(b, 0.7)])
    present = np.ones(probs.shape[:2], bool)
    gold = truth.copy()
    gold[1::2] = -1
    ours, ours_confusion, _ = dawid_skene(probs, present, gold)
    theirs, confusion, prior = dawid_skene_crowdkit(probs, present, gold)
    assert confusion.min() > 1e-3 and np.allclose(confusion.sum(axis=2), 1) and np.isclose(prior.sum(), 1)
    assert confusion[0, 5, 4] > 0.6 and ours_confusion[0, 5, 4] > 0.6  # surprise is heard as worried
    assert (theirs.argmax(1) == ours.argmax(1)).mean() > 0.95


def test_refine_bench_marks_the_params_defaults_and_the_share_recovered():
    from pipeline.bench.refine import is_default, recovered
    from pipeline.config import load_params, refine_config

    shipped = refine_config(load_params(Path(__file__).parents[1] / "params.yaml"))
    assert (shipped.method, shipped.mode) == ("cleanlab", "drop")  # what the README's table calls default
    assert is_default("cleanlab", None, "drop", shipped)
    assert is_default(f"cleanlab/{shipped.cleanlab.filter_by}", None, "drop", shipped)
    assert not is_default("cleanlab/both", None, "drop", shipped)
    assert not is_default("cleanlab", None, "hard", shipped)
    assert not is_default("weighted_vote", 0.9, "drop", shipped)
    vote = RefineConfig(stores=["a"], method="dawid_skene", mode="hard", correct_threshold=0.7)
    assert is_default("dawid_skene/crowdkit", 0.7, "hard", vote)
    assert not is_default("dawid_skene/numpy", 0.7, "hard", vote)
    assert not is_default("dawid_skene/crowdkit", 0.9, "hard", vote)
    assert recovered(0.5, 0.6, 0.7) == pytest.approx(0.5)
    assert recovered(0.6, 0.55, 0.7) == pytest.approx(-0.5)  # refinement can cost
    assert recovered(0.7, 0.69, 0.7) is None  # the noise cost nothing: no share to speak of


def test_one_blas_thread_limits_blas_inside_and_restores_it():
    """The regressions run on one BLAS thread (measured 2-7x faster on 2 cores); the rest of the
    process keeps its own count."""
    from threadpoolctl import threadpool_info

    from pipeline.refine.weak import one_blas_thread

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    assert before  # numpy's BLAS is loaded
    with one_blas_thread():
        assert set(blas_threads()) == {1}
    assert blas_threads() == before


def test_lightgbm_threads_change_no_probability(monkeypatch):
    """params.yaml runs LightGBM on 2 threads (2.0x on 2 cores): with col-wise histograms each
    feature's sums stay on one thread, so the out-of-fold probabilities are the same to the bit."""
    rng = np.random.default_rng(0)
    n = 150
    gold = _random_labels(n)
    X = rng.normal(size=(n, 40)) + np.eye(6)[gold] @ rng.normal(size=(6, 40))
    groups, mask = [f"g{i // 5}" for i in range(n)], np.ones(n, bool)
    monkeypatch.setattr("pipeline.refine.weak._cores", lambda: 2)  # two threads really run, even on one core
    probs = [cross_fit(make_weak("lightgbm", EMOTIONS, 0, lightgbm_cfg=LightGBMConfig(n_estimators=30, n_jobs=jobs)),
                       X, mask, gold, groups, 5, 0)[0] for jobs in (1, 2)]
    assert probs[0].std() > 0.01  # the trees learned something
    assert np.array_equal(probs[0], probs[1])
    with open(Path(__file__).parents[1] / "params.yaml", encoding="utf-8") as f:
        assert yaml.safe_load(f)["refine"]["lightgbm"]["n_jobs"] == 2


def test_lightgbm_never_gets_more_threads_than_cores(monkeypatch):
    """More OpenMP threads than cores is many times slower (they wait by spinning)."""
    from pipeline.refine import weak

    assert 1 <= weak._cores() <= (os.cpu_count() or 1)
    monkeypatch.setattr(weak, "_cores", lambda: 1)
    assert lightgbm(LightGBMConfig(n_jobs=2), 0).get_params()["n_jobs"] == 1
    monkeypatch.setattr(weak, "_cores", lambda: 16)
    assert lightgbm(LightGBMConfig(n_jobs=2), 0).get_params()["n_jobs"] == 2


def test_a_class_smaller_than_k_is_named_once_not_per_split(tmp_path: Path, caplog, recwarn):
    """One labelled 'surprise' clip under refine.k 3: one line naming the class and the key, and
    none of scikit-learn's per-split "least populated class" warnings (one per source and fold set)."""
    from pipeline.refine.vote import collect_votes

    root, clips = _tiny_project(tmp_path)
    surprise = [c for c in clips if c.label == "surprise"]
    clips = [c for c in clips if c not in surprise[1:]]
    write_manifest(clips, root / "manifest.jsonl")
    cfg = from_dict(RefineConfig, {"stores": ["feat"], "label_stores": [], "k": 3,
                                   "lightgbm": {"n_estimators": 5, "min_child_samples": 1}}, "refine")
    with caplog.at_level("WARNING"):
        votes = collect_votes(clips, cfg, root / "features")
    assert votes.sources == ["feat/logreg", "feat/lightgbm"]
    named = [r.getMessage() for r in caplog.records if "fewer labelled clips" in r.getMessage()]
    assert named == ["class(es) surprise (1) have fewer labelled clips than params key 'refine.k' (3): some folds "
                     "score them on no clip, and their out-of-fold votes are noisy"]
    assert not [w for w in recwarn if "least populated class" in str(w.message)]
