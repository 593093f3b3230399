from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import FusionConfig, TrainConfig, load_params
from pipeline.fusion.models import build_fusion, inputs_normalized_once
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip
from pipeline.fusion import train as train_mod
from pipeline.fusion.train import Features, cross_validate

REPO = Path(__file__).resolve().parents[1]


def synthetic(n=180, n_labelled=150, seed=0):
    """Modality `good` carries the label; `noise_a` and `noise_b` are noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 6
    clips = [Clip(name=f"c{i:03d}", english="x", label=EMOTIONS[y[i]] if i < n_labelled else None,
                  split="labelled" if i < n_labelled else "unlabelled") for i in range(n)]
    good = rng.standard_normal((6, 12))[y] + 0.6 * rng.standard_normal((n, 12))
    inputs = {"good": good.astype(np.float32), "noise_a": rng.standard_normal((n, 24)).astype(np.float32),
              "noise_b": rng.standard_normal((n, 6)).astype(np.float32)}
    return clips, Features([c.name for c in clips], inputs, np.ones((n, 3), bool), list(inputs)), y


def small(kind="ecmf", **kw):
    settings = {"folds": 3, "epochs": 25, "lr": 3e-3, "ensemble": 1, **kw}
    return TrainConfig(stores=["good", "noise_a", "noise_b"], model=FusionConfig(kind=kind, width=64), **settings)


@pytest.mark.parametrize("kind", ["ecmf", "mer_baseline"])
def test_learns_and_weights_favour_the_informative_modality(kind):
    clips, features, y = synthetic()
    result = cross_validate(clips, features, small(kind))
    from sklearn.metrics import f1_score

    f1 = f1_score(y[:150], result.oof_probs.argmax(1), average="weighted")
    assert f1 > 0.8  # honest: out of fold, nothing chosen on the clips scored
    mean_weights = result.weights[result.labelled].mean(axis=0)
    assert mean_weights[0] == mean_weights.max() and mean_weights[0] > 0.4
    assert result.unlabelled_probs.shape == (30, 6)
    np.testing.assert_allclose(result.unlabelled_probs.sum(1), 1, atol=1e-5)


def test_deterministic_given_the_seed():
    clips, features, _ = synthetic(n=90, n_labelled=72)
    a = cross_validate(clips, features, small(epochs=3))
    b = cross_validate(clips, features, small(epochs=3))
    np.testing.assert_array_equal(a.oof_probs, b.oof_probs)


def test_folds_never_leak_and_pseudo_labels_only_train(monkeypatch):
    clips, features, _ = synthetic(n=90, n_labelled=72)
    seen = []
    original = train_mod.train_fold

    def spy(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw):
        seen.append((fold, set(train_rows.tolist()), set(val_rows.tolist())))
        return original(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw)

    monkeypatch.setattr(train_mod, "train_fold", spy)
    pseudo = {clips[i].name: np.eye(6, dtype=np.float32)[0] for i in range(72, 90)}
    cross_validate(clips, features, small(epochs=1, use_pseudo=True, epoch_choice="inner_split"), pseudo=pseudo)
    unlabelled = set(range(72, 90))
    assert [fold for fold, _, _ in seen] == [0, 0, 1, 1, 2, 2]  # inner fit + refit on the whole training fold
    scored_by = {i: 0 for i in range(72)}
    for k in range(3):
        used = set()
        for fold, train_rows, val_rows in seen:  # val_rows: the inner split the epoch is chosen on
            if fold == k:
                assert not train_rows & val_rows
                assert not val_rows & unlabelled  # pseudo-labelled clips never choose the epoch
                assert unlabelled <= train_rows  # ...and they do train
                used |= train_rows | val_rows
        for i in set(range(72)) - used:  # the outer fold: neither trained on nor chosen on
            scored_by[i] += 1
    assert set(scored_by.values()) == {1}  # each labelled clip is scored once, by models blind to it


def test_epoch_is_never_chosen_on_the_scored_fold(monkeypatch):
    """The reported fold score is the outer fold's; the selection score is the inner split's."""
    clips, features, y = synthetic(n=90, n_labelled=90)
    result = cross_validate(clips, features, small(epochs=4, epoch_choice="inner_split"))
    from sklearn.metrics import f1_score

    assert len(result.selected_epochs) == 3 and all(0 <= e < 4 for e in result.selected_epochs)
    chosen = [max(h["val_weighted_f1"] for h in history) for history in result.histories]
    pooled = f1_score(y, result.oof_probs.argmax(1), average="weighted")
    assert result.fold_scores != chosen  # fold scores are not the selection scores
    assert abs(np.mean(result.fold_scores) - pooled) < 0.1
    assert not result.speaker_independent  # no groups in these clips


def test_folds_are_speaker_independent_only_when_every_scored_clip_names_its_group(tmp_path, caplog):
    """Some labelled clips without a group: the named ones are kept to one side of each split, the
    rest are split clip by clip; the run says so (log, metrics, summary) instead of claiming the folds
    are speaker-independent."""
    from pipeline.fusion.report import cv_metrics

    clips, features, _ = synthetic(n=90, n_labelled=90)
    named = [replace(c, group=f"s{i % 6}" if i >= 12 else None) for i, c in enumerate(clips)]
    with caplog.at_level("WARNING"):
        result = cross_validate(named, features, small(epochs=1))
    assert (result.folds_grouped_by, result.speaker_independent, result.labelled_without_group) == ("named", False, 12)
    assert any("12 of 90 labelled clips name no group (speaker), e.g. c000" in r.getMessage() for r in caplog.records)
    metrics = cv_metrics(named, result)
    assert (metrics["speaker_independent"], metrics["labelled_without_group"]) == (False, 12)
    everyone = cross_validate([replace(c, group=f"s{i % 6}") for i, c in enumerate(clips)], features, small(epochs=1))
    assert (everyone.speaker_independent, everyone.labelled_without_group) == (True, 0)


def test_fixed_epochs_train_on_the_whole_fold_and_only_watch_the_scored_one(monkeypatch):
    """`epoch_choice: fixed` (default): one model per outer fold, trained `epochs` epochs on every
    training clip; the scored fold is evaluated per epoch for the curves and changes nothing."""
    clips, features, _ = synthetic(n=90, n_labelled=72)
    seen = []
    original = train_mod.train_fold

    def spy(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw):
        seen.append((fold, set(train_rows.tolist()), set(val_rows.tolist()), kw.get("choose", True)))
        return original(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw)

    monkeypatch.setattr(train_mod, "train_fold", spy)
    cfg = small(epochs=3, use_pseudo=True)
    assert cfg.epoch_choice == "fixed"
    pseudo = {clips[i].name: np.eye(6, dtype=np.float32)[0] for i in range(72, 90)}
    watched = cross_validate(clips, features, cfg, pseudo=pseudo)
    unlabelled = set(range(72, 90))
    assert [fold for fold, *_ in seen] == [0, 1, 2] and not any(choose for *_, choose in seen)
    assert set().union(*(va for _, _, va, _ in seen)) == set(range(72))  # each scored fold watched once
    assert all(not tr & va and (tr - unlabelled) | va == set(range(72)) for _, tr, va, _ in seen)
    assert all(unlabelled <= tr and not va & unlabelled for _, tr, va, _ in seen)  # pseudo rows only train
    assert watched.selected_epochs == [2, 2, 2] and all(len(h) == 3 for h in watched.histories)
    assert all(c["selected_on"] == "fixed: train.epochs" and c["best_metric"] is None for c in watched.checkpoints)

    def blind(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw):
        return original(features, train_rows, train_targets, val_rows[:0], val_gold[:0], cfg, seed, fold, **kw)

    monkeypatch.setattr(train_mod, "train_fold", blind)
    unwatched = cross_validate(clips, features, cfg, pseudo=pseudo)
    np.testing.assert_array_equal(watched.oof_probs, unwatched.oof_probs)  # watching chose nothing
    assert watched.fold_scores == unwatched.fold_scores
    assert [h[-1]["val_weighted_f1"] for h in watched.histories] == pytest.approx(watched.fold_scores)


def test_refined_labels_train_but_gold_scores(monkeypatch):
    clips, features, _ = synthetic(n=60, n_labelled=60)
    captured = []
    original = train_mod.train_fold

    def spy(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw):
        captured.append((train_targets, val_gold))
        return original(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw)

    monkeypatch.setattr(train_mod, "train_fold", spy)
    refined = {c.name: np.eye(6, dtype=np.float32)[5] for c in clips}  # everything "surprise"
    cross_validate(clips, features, small(epochs=1, use_refined=True, epoch_choice="inner_split"), refined=refined)
    for targets, gold in captured:
        assert (targets.argmax(1) == 5).all()
    chosen_on = [gold for _, gold in captured if len(gold)]  # the refit chooses nothing
    assert len(chosen_on) == 3 and set(np.concatenate(chosen_on).tolist()) == set(range(6))


def test_refine_in_folds_gives_each_fold_targets_made_without_its_labels(monkeypatch, caplog):
    """train.refine_in_folds: the refiner is asked once per outer fold with exactly the clips that
    fold scores, and its targets (here: everything "surprise", dropped clips all zero) are the
    ones that train; the CV figure is then not flagged optimistic."""
    clips, features, _ = synthetic(n=90, n_labelled=72)
    asked, trained = [], []
    original = train_mod.train_fold

    def refiner(hidden):
        asked.append(set(hidden))
        refined = {c.name: np.eye(6, dtype=np.float32)[5] for c in clips[:72] if c.name not in hidden}
        refined[clips[0].name] = np.zeros(6, np.float32)  # mode drop: no training row
        return refined, {clips[80].name: np.eye(6, dtype=np.float32)[0]}

    def spy(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw):
        trained.append((fold, set(train_rows.tolist()), train_targets))
        return original(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw)

    monkeypatch.setattr(train_mod, "train_fold", spy)
    result = cross_validate(clips, features, small(epochs=1, use_refined=True, use_pseudo=True),
                            fold_refiner=refiner)
    folds = train_mod.training_folds([clips[i].label for i in range(72)], [None] * 72, 3, 0, "t")
    assert asked == [{clips[i].name for i in va} for _, va in folds]
    for fold, rows, targets in trained:
        assert rows == set(folds[fold][0].tolist()) - {0} | {80}  # the fold's training clips, the drop left out
        assert (targets.argmax(1)[:-1] == 5).all() and targets[-1].argmax() == 0  # ...refined, then the pseudo row
    assert result.refined_labels and result.refined_in_folds
    assert "use_refined" not in caplog.text
    for (tr, _), changes in zip(folds, result.label_changes):  # what each fold's refinement did, counted
        gold = [clips[i].label for i in tr if i != 0]
        assert changes == {"training_clips": len(gold), "left_out": int(0 in tr),
                           "relabelled": sum(g != "surprise" for g in gold), "softened": 0, "pseudo_labelled": 1}
    plain = cross_validate(clips, features, small(epochs=1, use_refined=True, refine_in_folds=False),
                           refined={c.name: np.eye(6, dtype=np.float32)[5] for c in clips[:72]}, fold_refiner=refiner)
    assert len(asked) == 3 and plain.refined_labels and not plain.refined_in_folds and "use_refined" in caplog.text


def test_missing_modality_is_masked_and_gets_zero_weight():
    dims = {"a": 4, "b": 3}
    for kind in ("ecmf", "mer_baseline", "concat"):
        model = build_fusion(dims, FusionConfig(kind=kind, width=16)).eval()
        inputs = {"a": torch.randn(2, 4), "b": torch.randn(2, 3)}
        mask = torch.tensor([[True, False], [True, True]])
        logits, weights = model(inputs, mask)
        assert torch.isfinite(logits).all()
        assert weights[0, 1] == 0 and torch.allclose(weights.sum(1), torch.ones(2))
        # the missing input's values cannot change the answer
        inputs2 = {"a": inputs["a"], "b": inputs["b"] * 100}
        logits2, _ = model(inputs2, mask)
        assert torch.allclose(logits[0], logits2[0], atol=1e-5)


def test_checkpoint_loads_with_weights_only(tmp_path):
    clips, features, _ = synthetic(n=60, n_labelled=60)
    result = cross_validate(clips, features, small(epochs=1))
    torch.save(result.checkpoints[0], tmp_path / "fold0.pt")
    ckpt = torch.load(tmp_path / "fold0.pt", weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "config", "epoch", "best_metric"}
    model = build_fusion(ckpt["dims"], FusionConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])


def test_unknown_kind_names_the_key():
    with pytest.raises(ValueError, match="train.model.kind"):
        build_fusion({"a": 2}, FusionConfig(kind="transformer-xl"))


def test_clips_without_any_modality_never_train_and_get_the_prior(monkeypatch):
    clips, features, _ = synthetic(n=90, n_labelled=72)
    features.mask[[0, 1, 80]] = False  # two labelled clips and one unlabelled with nothing usable
    seen = []
    original = train_mod.train_fold

    def spy(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw):
        seen.append(set(train_rows.tolist()) | set(val_rows.tolist()))
        return original(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw)

    monkeypatch.setattr(train_mod, "train_fold", spy)
    result = cross_validate(clips, features, small(epochs=2))
    assert all(not rows & {0, 1, 80} for rows in seen)
    assert result.excluded == [0, 1] and 0 not in result.labelled and len(result.labelled) == 70
    assert result.no_modality[[0, 1, 80]].all() and result.no_modality.sum() == 3
    row = result.unlabelled.index(80)
    np.testing.assert_allclose(result.unlabelled_probs[row], result.prior)
    np.testing.assert_allclose(result.prior.sum(), 1, atol=1e-6)
    assert np.isfinite(result.oof_probs).all() and np.isfinite(result.unlabelled_probs).all()


def test_ablation_rows_are_scored_on_the_same_clips():
    from pipeline.fusion.ablation import run_ablation, to_markdown

    clips, features, _ = synthetic(n=72, n_labelled=72)
    features.mask[:6, 1] = False  # noise_a missing for 6 clips...
    features.mask[:3, [0, 2]] = False  # ...3 of which have nothing else
    rows = run_ablation(clips, features, small(epochs=1))
    assert {r["scored"] for r in rows} == {72 - 3}  # the clips the full model is scored on
    by_name = {r["variant"]: r for r in rows}
    assert by_name["single: noise_a"]["prior"] == 3 and by_name["ecmf (all)"]["prior"] == 0
    assert "| clips scored | by the prior |" in to_markdown(rows)


def test_ablation_rows_for_a_single_model_one_store_and_a_store_too_small_to_fold():
    """`kind: single`: its own store first, no "without" rows (the crash: "single without good" had no
    `good`); one store with features: one row, not four identical ones under other kinds' names; a
    store on too few labelled clips to fold is a row that says so, not the end of the table."""
    from pipeline.fusion.ablation import run_ablation, to_markdown
    from pipeline.fusion.train import select

    clips, features, _ = synthetic(n=72, n_labelled=72)
    from pipeline.fusion.train import config_with

    rows = run_ablation(clips, features, config_with(small(epochs=5), kind="single", single="good"))
    assert [r["variant"] for r in rows] == ["single: good", "ecmf (all)", "mer_baseline (all)", "concat (all)",
                                            "single: noise_a", "single: noise_b"]
    assert rows[0]["weighted_f1"] > 0.8 > rows[-1]["weighted_f1"]

    (only,) = run_ablation(clips, select(features, ["good"]), small(epochs=1))
    assert only["variant"].startswith("single: good (the one store with features")

    features.mask[2:, 2] = False  # noise_b on 2 labelled clips: 3 folds cannot be made of them
    rows = run_ablation(clips, features, small(epochs=1))
    by_name = {r["variant"]: r for r in rows}
    assert "2 labelled clips cannot make 3 folds" in by_name["single: noise_b"]["skipped"]
    assert by_name["ecmf (all)"]["weighted_f1"] > by_name["ecmf without good"]["weighted_f1"] + 0.2 and len(rows) == 9
    assert "| single: noise_b | not trained: " in to_markdown(rows)


def test_an_ensemble_averages_its_members_per_fold(monkeypatch):
    """`train.ensemble: 2`: two models per outer fold with their own seeds, each trained on the
    fold's training clips only; the out-of-fold answer is the mean of the two."""
    clips, features, _ = synthetic(n=90, n_labelled=72)
    seeds = []
    original = train_mod.train_fold

    def spy(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw):
        seeds.append((fold, seed, len(val_rows) > 0))
        return original(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw)

    monkeypatch.setattr(train_mod, "train_fold", spy)
    result = cross_validate(clips, features, small(epochs=3, ensemble=2))
    assert [(f, member) for f, member in ((c["fold"], c["member"]) for c in result.checkpoints)] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert len({seed for fold, seed, _ in seeds if fold == 0}) == 2  # two members, two seeds
    assert all(isinstance(e, list) and len(e) == 2 for e in result.selected_epochs)
    from pipeline.fusion.train import Standardizer, predict

    # the members' own predictions, averaged, are the reported out-of-fold probabilities of fold 0
    folds = train_mod.training_folds([clips[i].label for i in range(72)], [None] * 72, 3, 0, "t")
    va = np.array(folds[0][1])
    probs = []
    for ckpt in (c for c in result.checkpoints if c["fold"] == 0):
        model = build_fusion(ckpt["dims"], FusionConfig(**ckpt["config"]["model"]))
        model.load_state_dict(ckpt["model"])
        norm = Standardizer.from_stats(ckpt["normalizer"])
        probs.append(predict(model, norm(features, va), torch.from_numpy(features.mask[va]))[0])
    np.testing.assert_allclose(result.oof_probs[va], np.mean(probs, axis=0), atol=1e-5)
    assert not np.allclose(probs[0], probs[1])  # the members differ


def test_a_dropped_clip_never_trains_but_is_still_scored(monkeypatch):
    """refine.mode drop writes an all-zero target: with use_refined the clip is in no training row."""
    clips, features, _ = synthetic(n=90, n_labelled=72)
    dropped = {clips[i].name: np.zeros(6, np.float32) for i in range(0, 72, 6)}
    seen = []
    original = train_mod.train_fold

    def spy(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw):
        seen.append(set(train_rows.tolist()))
        assert (train_targets.sum(axis=1) > 0).all()
        return original(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw)

    monkeypatch.setattr(train_mod, "train_fold", spy)
    result = cross_validate(clips, features, small(epochs=2, use_refined=True), refined=dropped)
    assert not set(range(0, 72, 6)) & set().union(*seen)
    assert len(result.labelled) == 72 and np.isfinite(result.oof_probs).all()  # scored against gold all the same
    assert result.refined_labels  # metrics.json says the CV figure is optimistic
    assert not cross_validate(clips, features, small(epochs=1), refined=dropped).refined_labels  # not used: honest


def test_reports_weights_per_class_sum_to_one_and_per_clip_mark_missing(tmp_path):
    """modality_weights.csv is one bar per predicted class, so each class's shares sum to 1 (a bar
    stacked over classes once reached 4.1); clip_weights.csv leaves a cell empty where a clip lacks
    that modality, which is how the error browser knows what was missing."""
    import csv
    from collections import defaultdict

    from pipeline.fusion.report import write_reports

    clips, features, _ = synthetic(n=60, n_labelled=48)
    features.mask[::5, 1] = False  # every fifth clip has no noise_a
    result = cross_validate(clips, features, small(epochs=2))
    write_reports(clips, result, tmp_path)
    shares = defaultdict(float)
    with (tmp_path / "plots" / "modality_weights.csv").open() as fh:
        for row in csv.DictReader(fh):
            shares[row["emotion"]] += float(row["weight"])
    predicted = {EMOTIONS[int(p)] for p in result.oof_probs.argmax(1)}
    assert predicted and all(abs(shares[e] - 1) < 2e-3 for e in predicted), dict(shares)
    with (tmp_path / "clip_weights.csv").open() as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert len(rows) == 60 and list(next(iter(rows.values()))) == ["name", "good", "noise_a", "noise_b"]
    for i, clip in enumerate(clips):
        row = rows[clip.name]
        assert (row["noise_a"] == "") == (i % 5 == 0)
        assert abs(sum(float(row[s]) for s in ("good", "noise_a", "noise_b") if row[s]) - 1) < 1e-3


def test_a_class_without_labelled_clips_has_no_f1_and_is_named(tmp_path, caplog):
    """A corpus without surprise (CREMA-D has none): its F1 is 0/0, not 0. Counted as 0 it pulled the
    macro F1 of a trial on RAVDESS without surprise from 0.891 to 0.743; it is null in metrics.json,
    has no bar in per_class_f1.csv, stays out of the macro mean, and the log names the class once."""
    import csv
    import dataclasses

    from sklearn.metrics import f1_score

    from pipeline.fusion.report import classification_metrics, write_reports

    clips, features, y = synthetic(n=90, n_labelled=72)
    clips = [dataclasses.replace(c, label="neutral") if c.label == "surprise" else c for c in clips]
    with caplog.at_level("WARNING"):
        result = cross_validate(clips, features, small(epochs=3))
        metrics = write_reports(clips, result, tmp_path)
    named = [r.getMessage() for r in caplog.records if "no labelled clip" in r.getMessage()]
    assert named == ["class(es) surprise have no labelled clip: no classifier learns them from labels, and macro "
                     "and per-class F1 leave them out"]
    gold = np.array([EMOTIONS.index(clips[i].label) for i in result.labelled])
    predicted = result.oof_probs.argmax(1)
    assert 5 not in set(predicted) and metrics["per_class_f1"]["surprise"] is None
    five = [metrics["per_class_f1"][e] for e in EMOTIONS[:5]]
    assert all(isinstance(v, float) for v in five)
    assert metrics["macro_f1"] == pytest.approx(np.mean(five), abs=1e-4)
    assert metrics["macro_f1"] == pytest.approx(f1_score(gold, predicted, average="macro"), abs=1e-4)
    old = f1_score(gold, predicted, average="macro", labels=range(6), zero_division=0)  # the 0-for-0/0 figure
    assert metrics["macro_f1"] > old + 0.05
    with (tmp_path / "plots" / "per_class_f1.csv").open() as fh:
        assert [r["emotion"] for r in csv.DictReader(fh)] == list(EMOTIONS[:5])
    # the classes come from the labels alone: a stray prediction of the absent class costs the true
    # class its recall, but does not bring the absent class back into the mean (rows stay comparable)
    m = classification_metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 5]))
    assert m["per_class_f1"]["surprise"] is None and m["per_class_f1"]["sad"] is None
    assert m["per_class_f1"]["happy"] == 0.0  # its one clip was called surprise
    assert m["macro_f1"] == pytest.approx(np.mean([m["per_class_f1"][e] for e in ("neutral", "angry", "happy")]))


def test_one_store_trains_the_single_head_and_says_so(caplog):
    clips, features, _ = synthetic(n=90, n_labelled=72)
    only = train_mod.select(features, ["good"])
    with caplog.at_level("WARNING"):
        fused = cross_validate(clips, only, small(epochs=3))
    assert "nothing to fuse" in caplog.text and fused.model_kind == "single"
    assert {c["config"]["model"]["kind"] for c in fused.checkpoints} == {"single"}
    assert all(c["config"]["model"]["single"] == "good" for c in fused.checkpoints)
    # the same model as asking for it: `single` on that store
    asked = cross_validate(clips, features, train_mod.config_with(small(epochs=3), kind="single", single="good"))
    np.testing.assert_array_equal(fused.oof_probs, asked.oof_probs)
    assert asked.model_kind == "single" and cross_validate(clips, features, small(epochs=1)).model_kind == "ecmf"


def test_fast_dropout_drops_p_keeps_the_mean_and_follows_its_generator():
    from pipeline.fusion.models import FastDropout

    drop = FastDropout(0.3).train()
    drop.generator = torch.Generator().manual_seed(1)
    x = torch.ones(400, 500)
    y = drop(x)
    assert abs(float((y == 0).float().mean()) - 0.3) < 0.005
    assert abs(float(y.mean()) - 1) < 0.01  # inverted dropout: the expectation is kept
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1 / (1 - drop.p))]
    drop.generator = torch.Generator().manual_seed(1)
    assert torch.equal(drop(x), y)  # the same stream gives the same mask
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)


def test_attention_layer_computes_what_torch_encoder_layer_does():
    """ECMF's written-out layer is nn.TransformerEncoderLayer(norm_first, ReLU, 2 x width)
    with the same weights, missing modalities masked as src_key_padding_mask does."""
    from pipeline.fusion.models import _AttentionLayer

    torch.manual_seed(0)
    reference = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.3, batch_first=True,
                                                 norm_first=True).eval()
    ours = _AttentionLayer(16, 4, 0.3).eval()
    ours.norm1.load_state_dict(reference.norm1.state_dict())
    ours.norm2.load_state_dict(reference.norm2.state_dict())
    ours.qkv.weight.data, ours.qkv.bias.data = reference.self_attn.in_proj_weight.data, reference.self_attn.in_proj_bias.data
    ours.out.load_state_dict(reference.self_attn.out_proj.state_dict())
    ours.feed_forward[0].load_state_dict(reference.linear1.state_dict())
    ours.feed_forward[3].load_state_dict(reference.linear2.state_dict())
    x = torch.randn(5, 3, 16)
    mask = torch.tensor([[True, True, True], [True, False, True], [False, False, True],
                         [True, True, False], [True, False, False]])
    with torch.no_grad():
        expected = reference(x, src_key_padding_mask=~mask)
        got = ours(x, mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_a_checkpoint_with_the_earlier_affine_input_norm_loads_and_gives_its_outputs():
    """The projection's LayerNorm has no affine now; a state dict that has one (scale g,
    shift b: the earlier projector) loads, folded into the Linear, and the projection gives
    what LayerNorm(g, b) -> Linear -> GELU gave."""
    torch.manual_seed(0)
    dims = {"audio": 7, "text": 3}
    model = build_fusion(dims, FusionConfig(kind="ecmf", width=8, heads=2)).eval()
    state = model.state_dict()
    assert not any(k.startswith("project.proj.audio.0.") for k in state)  # no affine of its own
    x = {s: torch.randn(5, d) for s, d in dims.items()}
    expected = {}
    for s, d in dims.items():
        earlier = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 8), torch.nn.GELU())
        torch.nn.init.uniform_(earlier[0].weight, 0.5, 1.5)
        torch.nn.init.normal_(earlier[0].bias)
        for k, v in earlier.state_dict().items():
            state[f"project.proj.{s}.{k}"] = v.clone()
        with torch.no_grad():
            expected[s] = earlier(x[s])
    model.load_state_dict(state)  # strict: the earlier keys are consumed, none left over
    with torch.no_grad():
        got = model.project(x)
    for j, s in enumerate(dims):
        torch.testing.assert_close(got[:, j], expected[s], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ecmf", "mer_baseline", "concat", "single"])
def test_the_input_norm_applied_once_gives_the_same_outputs_to_the_bit(kind):
    """train_fold applies the input LayerNorm to whole stores once (inputs_normalized_once) and
    the model skips it meanwhile: every batch gives exactly what the model gives on the raw
    batch, and afterwards the model normalises its inputs itself again."""
    torch.manual_seed(0)
    dims = {"text": 5} if kind == "single" else {"audio": 7, "text": 5}  # the trainer gives `single` its store only
    model = build_fusion(dims, FusionConfig(kind=kind, single="text", width=8, heads=2)).eval()
    x = {s: torch.randn(37, d) * 3 + 1 for s, d in dims.items()}
    mask = torch.rand(37, len(dims)) > 0.3
    mask[:, -1] = True
    with torch.no_grad():
        expected = [model({s: v[b:b + 8] for s, v in x.items()}, mask[b:b + 8]) for b in range(0, 37, 8)]
        with inputs_normalized_once(model, x) as (normalized,):
            assert not torch.equal(normalized["text"], x["text"])
            got = [model({s: v[b:b + 8] for s, v in normalized.items()}, mask[b:b + 8]) for b in range(0, 37, 8)]
        again = model({s: v[:8] for s, v in x.items()}, mask[:8])
    for (logits, weights), (want_logits, want_weights) in zip(got, expected):
        assert torch.equal(logits, want_logits) and torch.equal(weights, want_weights)
    assert torch.equal(again[0], expected[0][0])


@pytest.mark.parametrize("batch", [5, 64])
def test_the_projector_draws_the_bits_each_store_by_itself_would(batch):
    """One GELU and one dropout over every store's tokens: the same values, random bits included, as
    each store's own Linear, GELU and dropout one after another (so no trained number moves)."""
    from pipeline.fusion.models import set_dropout_generator

    torch.manual_seed(0)
    model = build_fusion({"a": 7, "b": 3, "c": 11}, FusionConfig(kind="ecmf", width=6, heads=2, dropout=0.3)).train()
    x = {s: torch.randn(batch, d) for s, d in (("a", 7), ("b", 3), ("c", 11))}
    set_dropout_generator(model, torch.Generator().manual_seed(5))
    expected = [model.project.proj[s](x[s]) for s in ("a", "b", "c")]  # LayerNorm, Linear, GELU, dropout each
    set_dropout_generator(model, torch.Generator().manual_seed(5))
    got = model.project(x)
    assert torch.equal(got, torch.stack(expected, dim=1))
    assert (got == 0).float().mean().item() == pytest.approx(0.3, abs=0.1)  # dropout did drop
    model.eval()
    assert torch.equal(model.project(x), torch.stack([model.project.proj[s](x[s]) for s in ("a", "b", "c")], dim=1))


def test_a_model_whose_input_norm_has_parameters_gets_its_inputs_as_they_are():
    model = build_fusion({"audio": 7}, FusionConfig(kind="concat", width=8))
    model.project.proj["audio"][0] = torch.nn.LayerNorm(7)  # the earlier projector (bench-train's reference rows)
    x = {"audio": torch.randn(4, 7)}
    with inputs_normalized_once(model, x) as (same,):
        assert same is x and not model.project.inputs_normalized


def test_an_earlier_input_norm_with_a_scale_and_no_shift_loads_too():
    """LayerNorm(bias=False) writes a scale only: it is folded in, not dropped."""
    torch.manual_seed(0)
    model = build_fusion({"audio": 7, "text": 3}, FusionConfig(kind="ecmf", width=8, heads=2)).eval()
    state = model.state_dict()
    earlier = torch.nn.Sequential(torch.nn.LayerNorm(7, bias=False), torch.nn.Linear(7, 8), torch.nn.GELU())
    torch.nn.init.uniform_(earlier[0].weight, 0.5, 1.5)
    state.update({f"project.proj.audio.{k}": v.clone() for k, v in earlier.state_dict().items()})
    model.load_state_dict(state)
    x = {"audio": torch.randn(5, 7), "text": torch.randn(5, 3)}
    with torch.no_grad():
        torch.testing.assert_close(model.project(x)[:, 0], earlier(x["audio"]), atol=1e-5, rtol=1e-5)


def test_members_side_by_side_give_what_one_after_another_gives(monkeypatch):
    """train.threads 2 trains an outer fold's two members at once, each in its own thread; every
    number is the one a single thread gives."""
    import threading

    clips, features, _ = synthetic(n=90, n_labelled=72)
    where = []
    original = train_mod.train_fold

    def spy(*args, **kw):
        where.append(threading.current_thread().name)
        return original(*args, **kw)

    monkeypatch.setattr(train_mod, "train_fold", spy)
    one = cross_validate(clips, features, small(epochs=3, ensemble=2, threads=1))
    assert all(not name.startswith("fusion-member") for name in where)
    where.clear()
    two = cross_validate(clips, features, small(epochs=3, ensemble=2, threads=2))
    assert len(where) == 6 and all(name.startswith("fusion-member") for name in where)
    np.testing.assert_array_equal(one.oof_probs, two.oof_probs)
    np.testing.assert_array_equal(one.unlabelled_probs, two.unlabelled_probs)


def test_train_speed_bench_times_the_torch_layer_reference_and_the_default(monkeypatch):
    """`make bench-train`: every row a full CV in this process; the reference row really trains
    torch's nn.TransformerEncoderLayer with nn.Dropout, the others ECMF's own layer."""
    from pipeline.bench import train_speed

    built = []
    original = train_speed._TorchLayerECMF.__init__

    def spy(self, *args, **kw):
        original(self, *args, **kw)
        built.append(self)

    monkeypatch.setattr(train_speed._TorchLayerECMF, "__init__", spy)
    monkeypatch.setitem(train_speed.STORE_SETS, "tiny", {"a": 12, "b": 8})
    rows = train_speed.run(60, ["tiny"], params=REPO / "params.yaml")
    assert [r["row"].split(",")[0] for r in rows][:2] == ["reference: torch encoder layer + dropout",
                                                         "written-out layer + FastDropout"]
    assert rows[0]["ratio_to_reference"] == 1.0 and all(r["seconds_per_fold"] > 0 for r in rows)
    assert len(built) == 10  # 5 folds x 2 members, the reference row only
    modules = list(built[0].modules())
    assert any(isinstance(m, torch.nn.TransformerEncoderLayer) for m in modules)
    assert not any(type(m).__name__ == "FastDropout" for m in modules)
    assert train_speed.member_module.build_fusion is build_fusion  # restored after the reference row
    assert isinstance(built[0].project, train_speed._EarlierProjector)  # the reference: the earlier projector
    assert train_speed.models_module._Projector.__name__ == "_Projector"  # restored after the earlier rows
    assert train_speed.member_module.inputs_normalized_once is inputs_normalized_once  # restored after the rows before
    assert rows[-2]["row"].endswith("the default") and len(rows) == 11
    assert "| tiny (20) | 60 |" in train_speed.to_markdown(rows)
    # the default row trains what params.yaml gives
    params = load_params(REPO / "params.yaml").train
    default = list(train_speed.row_settings())[-2][1]
    assert (default["batch_size"], default["lr"], default["epochs"], default["width"]) == \
        (params.batch_size, params.lr, params.epochs, params.model.width)


def test_train_speed_bench_runs_only_the_rows_asked_for_and_the_reference(monkeypatch, tmp_path):
    from pipeline.bench import train_speed

    monkeypatch.setitem(train_speed.STORE_SETS, "tiny", {"a": 12, "b": 8})
    seen = []
    real = train_speed.train_module.cross_validate
    monkeypatch.setattr(train_speed.train_module, "cross_validate",
                        lambda clips, features, cfg, **kw: seen.append(cfg) or real(clips, features, cfg, **kw))
    rows = train_speed.run(60, ["tiny"], only=[9], params=REPO / "params.yaml")
    assert [r["row"] for r in rows] == [train_speed.VARIANTS[0][0], train_speed.VARIANTS[9][0]]
    # row 9 still carries every change above it: members side by side, width 64, the new batch
    assert (seen[1].threads, seen[1].model.width, seen[1].batch_size, seen[1].epochs) == (2, 64, 64, 16)
    assert (seen[0].threads, seen[0].model.width, seen[0].batch_size, seen[0].epochs) == (1, 128, 32, 20)
    # ...and is params.yaml's train section field for field (thresholds, dropout, C...), stores aside
    assert seen[1] == replace(load_params(REPO / "params.yaml").train, stores=["a", "b"])
    # every row's other fields follow the params file it is given
    seen.clear()
    edited = yaml.safe_load((REPO / "params.yaml").read_text())
    edited["train"]["self_training_threshold"] = 0.55
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited))
    train_speed.run(60, ["tiny"], only=[9], params=tmp_path / "params.yaml")
    assert [cfg.self_training_threshold for cfg in seen] == [0.55, 0.55]


def test_target_changes_tells_left_out_relabelled_and_softened_apart():
    from pipeline.fusion.targets import describe, target_changes

    eye = np.eye(6, dtype=np.float32)
    targets = np.stack([eye[0], np.zeros(6, np.float32), eye[2], eye[3] * 0.6 + eye[1] * 0.4, eye[4] * 0.7 + eye[5] * 0.3])
    changes = target_changes(np.array([0, 1, 1, 3, 4]), targets, 7)
    assert changes == {"training_clips": 4, "left_out": 1, "relabelled": 1, "softened": 2, "pseudo_labelled": 7}
    assert describe(changes) == ("4 labelled clips (1 left out, 1 relabelled, 2 softened by refinement) "
                                 "+ 7 pseudo-labelled")


def test_fit_linear_is_scikit_learns_regression_on_the_standardised_stores():
    from sklearn.linear_model import LogisticRegression

    from pipeline.fusion.linear import fit_linear
    from pipeline.fusion.train import predict

    clips, features, y = synthetic(n=90, n_labelled=90)
    features.mask[70, 1] = False  # a test clip without noise_a: its standardised input counts as zero
    train, test = np.arange(60), np.arange(60, 90)
    targets = np.eye(6, dtype=np.float32)[y[train]]
    targets[targets.argmax(1) == 5] = np.eye(6, dtype=np.float32)[0]  # class 5 never trains
    member = fit_linear(features, train, targets, c=0.05, seed=0)
    x = lambda rows: torch.cat(list(member["norm"](features, rows).values()), 1).numpy()  # noqa: E731
    reference = LogisticRegression(C=0.05, max_iter=1000).fit(x(train), targets.argmax(1))
    probs, weights = predict(member["model"], member["norm"](features, test), torch.from_numpy(features.mask[test]))
    np.testing.assert_allclose(probs[:, :5], reference.predict_proba(x(test)), atol=1e-4)
    assert (probs[:, 5] < 1e-9).all() and np.isfinite(probs).all()  # the absent class: never NaN, never chosen
    np.testing.assert_allclose(weights[10], [0.5, 0, 0.5])  # uniform over the present stores
    two = np.eye(6, dtype=np.float32)[np.where(y[train] % 2 == 0, 1, 4)]  # a fold of two classes: binary form
    member = fit_linear(features, train, two, c=0.05, seed=0)
    reference = LogisticRegression(C=0.05, max_iter=1000).fit(x(train), two.argmax(1))
    probs, _ = predict(member["model"], member["norm"](features, test), torch.from_numpy(features.mask[test]))
    np.testing.assert_allclose(probs[:, [1, 4]], reference.predict_proba(x(test)), atol=1e-4)
    one = np.eye(6, dtype=np.float32)[np.full(len(train), 2)]  # one class: always that class
    member = fit_linear(features, train, one, c=0.05, seed=0)
    probs, _ = predict(member["model"], member["norm"](features, test), torch.from_numpy(features.mask[test]))
    assert (probs.argmax(1) == 2).all() and np.isfinite(probs).all()


def test_linear_member_is_blended_by_its_weight_and_round_trips_through_checkpoints(tmp_path):
    from pipeline.fusion.checkpoint import load_folds
    from pipeline.fusion.predict import _ensemble

    clips, features, _ = synthetic(n=90, n_labelled=72)
    plain = cross_validate(clips, features, small(epochs=2, ensemble=2))
    blend = cross_validate(clips, features, small(epochs=2, ensemble=2, linear_weight=0.3, linear_c=0.05))
    assert [(c["fold"], c["member"], c["head"], c["blend_weight"]) for c in blend.checkpoints] == [
        (k, m, head, pytest.approx(w)) for k in range(3)
        for m, head, w in ((0, "fusion", 0.35), (1, "fusion", 0.35), ("linear", "linear", 0.3))]
    # the fusion members are the same models as without the linear member; what is added is a distribution
    linear_oof = (blend.oof_probs - 0.7 * plain.oof_probs) / 0.3
    np.testing.assert_allclose(linear_oof.sum(1), 1, atol=1e-4)
    assert (linear_oof > -1e-4).all() and not np.allclose(linear_oof, plain.oof_probs, atol=1e-2)
    np.testing.assert_allclose(blend.weights, plain.weights, atol=1e-6)  # modality weights: the fusion gates'
    for ckpt in blend.checkpoints:
        torch.save(ckpt, tmp_path / f"fold{ckpt['fold']}-{ckpt['member']}.pt")
    out = _ensemble(clips, features, load_folds(tmp_path), {})  # what `mer predict` does with the files
    got = np.array([[r["probabilities"][e] for e in EMOTIONS] for r in out])[blend.unlabelled]
    np.testing.assert_allclose(got, blend.unlabelled_probs, atol=1e-4)


def test_linear_weight_is_checked_at_the_start():
    with pytest.raises(ValueError, match="train.linear_weight"):
        small(linear_weight=1.0)
    with pytest.raises(ValueError, match="train.linear_c"):
        small(linear_c=0.0)


def test_screening_masks_the_stores_that_predict_nothing_on_the_training_fold():
    """`train.screen_stores`: per outer fold, a store whose inner cross-fitted regression does not
    beat the class frequencies' log loss is masked; the informative one always stays."""
    from pipeline.fusion import screen

    clips, features, y = synthetic()
    rows = np.arange(150)
    result = screen.screen(features, rows, y[rows], [None] * 150, c=0.05, seed=0)
    assert result.kept == ["good"] and not result.why
    assert result.log_loss["good"] < result.prior_log_loss["good"] < result.log_loss["noise_a"]
    assert "noise_a" in screen.describe(result) and "(out)" in screen.describe(result)
    # a clip that has only screened-out stores keeps its own mask: the models still answer it
    mask = np.array([[True, True, False], [False, True, True]])
    np.testing.assert_array_equal(screen.screened_mask(mask, features.stores, ["good"]),
                                  [[True, False, False], [False, True, True]])
    # a large training fold is screened on a seeded sample, with the same answer here
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(screen, "SCREEN_MAX_CLIPS", 90)
        assert screen.screen(features, rows, y[rows], [None] * 150, c=0.05, seed=0).kept == ["good"]
    # labels no store predicts: the lowest log loss stays, and the line says that none passed
    shuffled = np.random.default_rng(2).permutation(y[rows])
    noise = screen.screen(features, rows, shuffled, [None] * 150, c=0.05, seed=0)
    assert noise.none_passed and len(noise.kept) == 1 and "no store predicts" in screen.describe(noise)
    # fewer speakers than inner folds: one speaker held out per inner fold (it kept every store untested)
    two = screen.screen(features, rows, y[rows], ["a", "b"] * 75, c=0.05, seed=0)
    assert two.kept == ["good"] and not two.why
    # too few clips to split the training fold: every store stays, and the reason is given
    few = screen.screen(features, rows[:2], y[rows[:2]], [None] * 2, c=0.05, seed=0)
    assert few.kept == features.stores and "cannot be split" in few.why


def test_screened_folds_train_without_the_noise_and_predict_masks_the_same(tmp_path):
    from pipeline.fusion.checkpoint import load_folds
    from pipeline.fusion.predict import _ensemble

    clips, features, _ = synthetic(n=90, n_labelled=72)
    result = cross_validate(clips, features, small(epochs=3, ensemble=2, linear_weight=0.5, screen_stores=True))
    assert result.kept_stores == [["good"]] * 3
    assert {tuple(c["kept_stores"]) for c in result.checkpoints} == {("good",)}
    # the masked stores get no modality weight and their linear coefficients stay zero
    assert (result.weights[:, 1:] == 0).all() and (result.weights[:, 0] == 1).all()
    linear = [c for c in result.checkpoints if c["head"] == "linear"][0]
    assert linear["model"]["linears.noise_a.weight"].abs().max() == 0
    for ckpt in result.checkpoints:
        torch.save(ckpt, tmp_path / f"fold{ckpt['fold']}-{ckpt['member']}.pt")
    out = _ensemble(clips, features, load_folds(tmp_path), {})
    got = np.array([[r["probabilities"][e] for e in EMOTIONS] for r in out])[result.unlabelled]
    np.testing.assert_allclose(got, result.unlabelled_probs, atol=1e-4)
    unscreened = cross_validate(clips, features, small(epochs=3, ensemble=2, linear_weight=0.5))
    assert unscreened.kept_stores == [features.stores] * 3 and not np.allclose(unscreened.oof_probs, result.oof_probs, atol=1e-3)


@pytest.mark.parametrize("teacher", ["linear", "fold"])
def test_self_training_never_reads_the_labels_of_the_clips_it_scores(monkeypatch, teacher):
    """train.self_training: round 2 of a fold trains on its own confident answers for the clips it
    scores and the candidates. Scrambling the gold labels of one fold's scored clips must leave that
    fold's answers as they were (its labels are read only to score it), and the pseudo-labelled
    rows are counted per fold."""
    clips, features, _ = synthetic(n=90, n_labelled=72)
    fixed = [(np.flatnonzero(np.arange(72) % 3 != f), np.flatnonzero(np.arange(72) % 3 == f)) for f in range(3)]
    monkeypatch.setattr(train_mod, "training_folds", lambda *a, **k: fixed)  # folds that labels do not move
    cfg = small(epochs=6, self_training=True, self_training_threshold=0.5, self_training_teacher=teacher, linear_c=1.0,
                self_training_min_clips=48)
    trained, original = [], train_mod.train_fold

    def spy(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw):
        trained[fold:] = [set(train_rows.tolist())]  # the fold's last model: the one that scores it
        return original(features, train_rows, train_targets, val_rows, val_gold, cfg, seed, fold, **kw)

    monkeypatch.setattr(train_mod, "train_fold", spy)
    result = cross_validate(clips, features, cfg)
    scored = fixed[0][1]
    for (tr, va), rows in zip(fixed, trained):  # each fold trains on pseudo-labels of its own scored clips and
        assert rows & set(va.tolist()) and rows & set(range(72, 90)) and set(tr.tolist()) <= rows  # candidates
    rng = np.random.default_rng(1)
    scrambled = [Clip(**{**c.__dict__, "label": EMOTIONS[(EMOTIONS.index(c.label) + rng.integers(1, 6)) % 6]})
                 if i in set(scored.tolist()) else c for i, c in enumerate(clips)]
    again = cross_validate(scrambled, features, cfg)
    np.testing.assert_array_equal(result.oof_probs[scored], again.oof_probs[scored])
    assert not np.array_equal(result.oof_probs[fixed[1][1]], again.oof_probs[fixed[1][1]])  # the others trained on them
    pool = 24 + 18  # a fold's scored clips + the unlabelled ones
    assert len(result.self_trained) == 3 and all(0 < n <= pool for n in result.self_trained)
    plain = cross_validate(clips, features, small(epochs=6, linear_c=1.0))
    assert plain.self_trained == [] and not np.array_equal(plain.oof_probs, result.oof_probs)
    strict = cross_validate(clips, features, replace(cfg, self_training_threshold=0.99))
    assert sum(strict.self_trained) < sum(result.self_trained)
    few = cross_validate(clips, features, replace(cfg, self_training_min_clips=49))  # 48 training clips a fold
    assert few.self_trained == [None, None, None]
    np.testing.assert_array_equal(few.oof_probs, plain.oof_probs)  # no pseudo row: exactly the plain trainer


@pytest.mark.parametrize("teacher", ["linear", "fold"])
def test_the_linear_teacher_is_the_folds_linear_member(monkeypatch, teacher):
    """With the linear teacher the fold's linear member is fitted once, first, on the labelled
    training rows only, and answers the pool; the fusion members then train on those rows plus its
    confident answers. The fold teacher instead trains the whole fold twice, the linear member too,
    and its second fit sees the pseudo-labels."""
    clips, features, _ = synthetic(n=90, n_labelled=72)
    fixed = [(np.flatnonzero(np.arange(72) % 3 != f), np.flatnonzero(np.arange(72) % 3 == f)) for f in range(3)]
    monkeypatch.setattr(train_mod, "training_folds", lambda *a, **k: fixed)
    fits, members, original_fit, original_train = [], [], train_mod.fit_linear, train_mod.train_fold

    def fit_spy(features, rows, *args, **kw):
        fits.append(set(rows.tolist()))
        return original_fit(features, rows, *args, **kw)

    def train_spy(features, train_rows, *args, **kw):
        members.append(set(train_rows.tolist()))
        return original_train(features, train_rows, *args, **kw)

    monkeypatch.setattr(train_mod, "fit_linear", fit_spy)
    monkeypatch.setattr(train_mod, "train_fold", train_spy)
    cfg = small(epochs=4, self_training=True, self_training_threshold=0.5, self_training_teacher=teacher,
                linear_c=1.0, linear_weight=0.5, self_training_min_clips=48)
    result = cross_validate(clips, features, cfg)
    assert all(n > 0 for n in result.self_trained)
    labelled = [set(tr.tolist()) for tr, _ in fixed]
    if teacher == "linear":
        assert fits == labelled  # one fit a fold, no pseudo row in it
        assert all(m > l for m, l in zip(members, labelled))  # the fusion member trains on its confident answers
    else:
        assert fits[0::2] == labelled and all(f > l for f, l in zip(fits[1::2], labelled))
    assert [c["head"] for c in result.checkpoints].count("linear") == 3


def test_self_training_keeps_at_most_max_ratio_pseudo_labels_the_surest_first(monkeypatch, caplog):
    """train.self_training_max_ratio caps a fold's pseudo-labels at that many per labelled training
    clip: each class keeps its share of the confident answers, its surest first (ties in pool
    order), and the log says the cap bound."""
    from pipeline.fusion.targets import confident_targets

    probs = np.full((5, 6), 0.0, np.float32)
    probs[np.arange(5), [1, 2, 3, 4, 5]] = [0.9, 0.75, 0.95, 0.6, 0.75]
    rows = np.array([10, 11, 12, 13, 14])
    assert confident_targets(probs, rows, 0.7)[0].tolist() == [10, 11, 12, 14]
    kept, targets, confident = confident_targets(probs, rows, 0.7, 3)
    assert kept.tolist() == [10, 11, 12] and targets.argmax(1).tolist() == [1, 2, 3]  # 0.95, 0.9, the first 0.75
    assert confident == 4  # reached the threshold; 3 kept
    assert confident_targets(probs, rows, 0.7, 2)[0].tolist() == [10, 12]
    skewed = np.eye(6, dtype=np.float32)[[0, 0, 0, 0, 1, 1]] * np.array([[.99], [.98], [.97], [.96], [.8], [.75]])
    kept, targets, _ = confident_targets(skewed, np.arange(6), 0.7, 3)
    assert kept.tolist() == [0, 1, 4] and targets.argmax(1).tolist() == [0, 0, 1]  # each class keeps its share
    with pytest.raises(ValueError, match="train.self_training_max_ratio"):
        small(self_training_max_ratio=-1.0)

    clips, features, _ = synthetic(n=90, n_labelled=72)
    fixed = [(np.flatnonzero(np.arange(72) % 3 != f), np.flatnonzero(np.arange(72) % 3 == f)) for f in range(3)]
    monkeypatch.setattr(train_mod, "training_folds", lambda *a, **k: fixed)
    cfg = small(epochs=2, self_training=True, self_training_threshold=0.5, linear_c=1.0, linear_weight=0.5,
                self_training_min_clips=48, self_training_max_ratio=0)
    uncapped = cross_validate(clips, features, cfg)
    assert all(n > 12 for n in uncapped.self_trained)  # 48 labelled training clips, a pool of 42
    with caplog.at_level("INFO"):
        capped = cross_validate(clips, features, replace(cfg, self_training_max_ratio=0.25))
    assert capped.self_trained == [12, 12, 12]  # int(0.25 x 48)
    assert "train.self_training_max_ratio 0.25 x 48 labelled" in caplog.text
    assert cross_validate(clips, features, replace(cfg, self_training_max_ratio=1.0)).self_trained == uncapped.self_trained


def test_mixup_blends_each_clip_with_a_partner_mostly_itself():
    from pipeline.fusion.member import _mixup

    inputs = {"a": torch.arange(12, dtype=torch.float32).view(6, 2), "b": torch.randn(6, 3)}
    targets = torch.eye(6)
    mask = torch.tensor([[True, False]] * 3 + [[False, True]] * 3)
    raw_below_half = False
    for seed in range(8):  # raw Beta draws on both sides of 0.5: the fold to >= 0.5 is exercised
        raw_below_half |= np.random.default_rng(seed).beta(1.0, 1.0) < 0.5
        generator = torch.Generator().manual_seed(seed)
        partner = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
        mixed, mixed_targets, mixed_mask = _mixup(inputs, targets, mask, 1.0, np.random.default_rng(seed), generator)
        np.testing.assert_allclose(mixed_targets.sum(1).numpy(), 1.0, atol=1e-6)
        share = max(float(mixed_targets[row, row]) for row in range(6) if partner[row] != row)
        assert 0.5 <= share <= 1.0
        for row in range(6):  # its own target at `share`, its partner's at 1 - share, inputs likewise
            other = int(partner[row])
            expected = torch.zeros(6)
            expected[row] += share
            expected[other] += 1 - share
            np.testing.assert_allclose(mixed_targets[row].numpy(), expected.numpy(), atol=1e-6)
            for name, x in inputs.items():
                np.testing.assert_allclose(mixed[name][row].numpy(), (share * x[row] + (1 - share) * x[other]).numpy(),
                                           atol=1e-5)
            assert mixed_mask[row].tolist() == (mask[row] | mask[other]).tolist()
        again = _mixup(inputs, targets, mask, 1.0, np.random.default_rng(seed), torch.Generator().manual_seed(seed))
        np.testing.assert_array_equal(again[1].numpy(), mixed_targets.numpy())
    assert raw_below_half


def test_modality_dropout_hides_modalities_of_the_blend_not_of_the_clips_before(monkeypatch):
    """Dropout after mixup: a modality it hides is hidden in the blend; were it drawn first,
    the partner's mask would bring most hidden modalities back."""
    from pipeline.fusion import member

    clips, features, _ = synthetic(n=90, n_labelled=72)
    calls = []
    mixup, drop = member._mixup, member._drop_modalities

    def spy_mixup(inputs, targets, mask, *args):
        out = mixup(inputs, targets, mask, *args)
        calls.append(("mixup", out[2].clone()))
        return out

    def spy_drop(mask, p, generator):
        calls.append(("drop", mask.clone()))
        return drop(mask, p, generator)

    monkeypatch.setattr(member, "_mixup", spy_mixup)
    monkeypatch.setattr(member, "_drop_modalities", spy_drop)
    cross_validate(clips, features, small(epochs=2, threads=1, mixup=1.0))
    assert calls and len(calls) % 2 == 0
    for (first, blended), (second, dropped_from) in zip(calls[::2], calls[1::2]):
        assert (first, second) == ("mixup", "drop")
        assert torch.equal(blended, dropped_from)


def test_mixup_trains_reproducibly_side_by_side_and_is_checked_at_the_start():
    clips, features, _ = synthetic(n=90, n_labelled=72)
    plain = cross_validate(clips, features, small(epochs=3, ensemble=2, threads=1))
    one = cross_validate(clips, features, small(epochs=3, ensemble=2, threads=1, mixup=1.0))
    two = cross_validate(clips, features, small(epochs=3, ensemble=2, threads=2, mixup=1.0))
    assert not np.array_equal(plain.oof_probs, one.oof_probs)  # it changes what trains
    np.testing.assert_array_equal(one.oof_probs, two.oof_probs)
    np.testing.assert_array_equal(one.unlabelled_probs, two.unlabelled_probs)
    for bad in (-0.5, float("inf")):
        with pytest.raises(ValueError, match="train.mixup"):
            small(mixup=bad)
