"""Metrics, DVC plot files and the submission CSV from a cross-validation result."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.errors import TrainError
from pipeline.labels import EMOTIONS, scored_classes
from pipeline.manifest import Clip
from pipeline.tables import rounded, write_json
from pipeline.fusion.train import CVResult


def classification_metrics(gold: np.ndarray, predicted: np.ndarray) -> dict:
    """Weighted F1 (the MER2025 metric), accuracy, macro F1 and per-class F1. A class no scored clip is
    labelled as has no F1: null in `per_class_f1`, outside the macro mean (scored_classes)."""
    from sklearn.metrics import accuracy_score, f1_score

    labels = scored_classes(gold)
    per_class = dict(zip(labels, f1_score(gold, predicted, average=None, labels=labels, zero_division=0)))
    return {
        "weighted_f1": float(f1_score(gold, predicted, average="weighted", labels=labels, zero_division=0)),
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", labels=labels, zero_division=0)),
        "per_class_f1": {name: float(per_class[c]) if c in per_class else None for c, name in enumerate(EMOTIONS)},
    }


def candidates_of(clips: list[Clip]) -> list[int]:
    """Rows to submit: the clips marked `candidate`, or every unlabelled clip when none is marked."""
    marked = [i for i, c in enumerate(clips) if c.candidate]
    return marked or [i for i, c in enumerate(clips) if not c.label]


def cv_metrics(clips: list[Clip], result: CVResult) -> dict:
    """Out-of-fold scores plus what they cover: clips left out, candidates answered by the prior."""
    gold = np.array([EMOTIONS.index(clips[i].label) for i in result.labelled])
    metrics = classification_metrics(gold, result.oof_probs.argmax(1))
    scores = np.array(result.fold_scores)
    metrics["folds"] = {"weighted_f1_mean": float(scores.mean()), "weighted_f1_std": float(scores.std()),
                        "weighted_f1": [float(s) for s in scores], "selected_epochs": result.selected_epochs}
    metrics["n_labelled"] = len(result.labelled)
    metrics["excluded_no_modality"] = len(result.excluded)
    metrics["speaker_independent"] = bool(result.speaker_independent)
    metrics["folds_grouped_by"] = result.folds_grouped_by or None  # named | voice clusters | one speaker | null: by clip
    metrics["labelled_without_group"] = result.labelled_without_group  # named folds: scored clips split on their own
    metrics["refined_labels"] = bool(result.refined_labels)  # trained on refined labels
    metrics["pseudo_labels"] = bool(result.pseudo_labels)  # trained on pseudo-labelled clips too
    metrics["refined_in_folds"] = bool(result.refined_in_folds)  # false with either: optimistic
    # per outer fold, what refinement did to its training targets (left out, relabelled, softened, pseudo)
    metrics["label_changes_per_fold"] = list(result.label_changes)
    metrics["stores"] = list(result.stores)
    metrics["speaker_norm"] = bool(result.speaker_normalized)  # stores standardised per speaker (group)
    metrics["speaker_groups"] = result.speaker_groups or None  # named | voice clusters (pseudo-speakers)
    metrics["model_kind"] = result.model_kind  # `single` where one store carried features (nothing to fuse)
    metrics["stores_without_clips"] = list(result.dropped)
    # per outer fold, the stores its models read (train.screen_stores masks the others: screen.py)
    metrics["kept_stores_per_fold"] = [list(k) for k in result.kept_stores]
    # train.self_training: pseudo-labelled clips per fold, null where the fold was too small to self-train
    metrics["self_trained_per_fold"] = list(result.self_trained)
    candidates = candidates_of(clips)
    by_prior = int(sum(bool(result.no_modality[i]) for i in candidates)) if result.no_modality is not None else 0
    metrics["candidates"] = {"total": len(candidates), "predicted_by_model": len(candidates) - by_prior,
                             "prior_no_modality": by_prior,
                             "coverage": (len(candidates) - by_prior) / len(candidates) if candidates else 1.0}
    if not _all_finite(metrics):
        raise TrainError(f"metrics are not finite ({metrics}); nothing was written")
    return rounded(metrics)


def _all_finite(value: object) -> bool:
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return not isinstance(value, float) or bool(np.isfinite(value))


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def write_reports(clips: list[Clip], result: CVResult, out: Path) -> dict:
    """predictions.csv (+ probabilities), plots/*.csv (DVC plots), and metrics.json last."""
    out = Path(out)
    metrics = cv_metrics(clips, result)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(clips, result, out)
    stores = result.stores
    plots = out / "plots"
    predicted = result.oof_probs.argmax(1)
    _write_csv(plots / "confusion.csv", ["actual", "predicted"],
               [[clips[i].label, EMOTIONS[p]] for i, p in zip(result.labelled, predicted)])
    _write_csv(plots / "curves.csv", ["step", "fold", "train_loss", "val_weighted_f1"],
               [[h["epoch"], k, round(h["train_loss"], 5), round(h["val_weighted_f1"], 5)]
                for k, history in enumerate(result.histories) for h in history])
    _write_csv(plots / "per_class_f1.csv", ["emotion", "f1"],  # a class with no F1 (null) has no bar
               [[e, f1] for e, f1 in metrics["per_class_f1"].items() if f1 is not None])
    weights = result.weights[result.labelled]
    columns = stores if weights.shape[1] == len(stores) else stores[: weights.shape[1]]
    _write_csv(plots / "modality_weights.csv", ["emotion", "modality", "weight"],
               [[e, m, round(float(weights[predicted == c, j].mean()) if (predicted == c).any() else 0.0, 4)]
                for c, e in enumerate(EMOTIONS) for j, m in enumerate(columns)])
    write_clip_weights(clips, result, out / "clip_weights.csv")
    write_json(out / "metrics.json", metrics, sort_keys=False)  # weighted F1 first, as `dvc exp show` lists it
    return metrics


def write_clip_weights(clips: list[Clip], result: CVResult, path: Path) -> None:
    """Every clip's modality weights, one column per store; an empty cell where the clip lacks that
    modality (the model masked it), so the one file says both what the model leaned on and what was
    missing. Out of fold for labelled clips, the fold average otherwise (as the probabilities)."""
    present = result.present if result.present is not None else result.weights > 0
    stores = result.stores[: result.weights.shape[1]]
    _write_csv(path, ["name", *stores],
               [[clip.name, *[round(float(w), 4) if has else "" for w, has in zip(result.weights[i], present[i])]]
                for i, clip in sorted(enumerate(clips), key=lambda pair: pair[1].name)])


def clip_probabilities(clips: list[Clip], result: CVResult) -> dict[int, tuple[str, np.ndarray]]:
    """Row -> (kind, probabilities) for every clip: `labelled_oof`, `unlabelled` (fold average) or
    `prior_no_modality` (no usable modality: the training prior)."""
    out: dict[int, tuple[str, np.ndarray]] = {}
    out.update({i: ("labelled_oof", p) for i, p in zip(result.labelled, result.oof_probs)})
    for i, p in zip(result.unlabelled, result.unlabelled_probs):
        out[i] = ("prior_no_modality" if result.no_modality is not None and result.no_modality[i] else "unlabelled", p)
    out.update({i: ("prior_no_modality", result.prior) for i in result.excluded})
    return out


def write_predictions(clips: list[Clip], result: CVResult, out: Path) -> None:
    """MER2025 submission `name,discrete`: exactly one row per candidate (all unlabelled clips
    when none are marked), labelled candidates by their out-of-fold prediction; plus every
    clip's probabilities, with its kind and a `no_modality` flag."""
    probs = clip_probabilities(clips, result)
    candidates = candidates_of(clips)
    missing = [clips[i].name for i in candidates if i not in probs]
    if missing:
        raise TrainError(f"{len(missing)} candidates got no prediction (e.g. {missing[:3]}); this is a bug")
    _write_csv(out / "predictions.csv", ["name", "discrete"],
               [[clips[i].name, EMOTIONS[int(probs[i][1].argmax())]] for i in candidates])
    is_candidate = set(candidates)
    rows = sorted((clips[i].name, kind, int(i in is_candidate), int(kind == "prior_no_modality"), p)
                  for i, (kind, p) in probs.items())
    _write_csv(out / "predictions_proba.csv", ["name", "kind", "candidate", "no_modality", *EMOTIONS],
               [[n, kind, cand, flag, *[round(float(x), 5) for x in p]] for n, kind, cand, flag, p in rows])
