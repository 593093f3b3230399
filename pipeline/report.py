"""Metrics, DVC plot files and the submission CSV from a cross-validation result."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip
from pipeline.tables import rounded
from pipeline.train import CVResult


def classification_metrics(gold: np.ndarray, predicted: np.ndarray) -> dict:
    """Weighted F1 (the MER2025 metric), accuracy, macro F1 and per-class F1."""
    from sklearn.metrics import accuracy_score, f1_score

    labels = list(range(len(EMOTIONS)))
    per_class = f1_score(gold, predicted, average=None, labels=labels, zero_division=0)
    return {
        "weighted_f1": float(f1_score(gold, predicted, average="weighted", labels=labels, zero_division=0)),
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", labels=labels, zero_division=0)),
        "per_class_f1": {name: float(v) for name, v in zip(EMOTIONS, per_class)},
    }


def cv_metrics(clips: list[Clip], result: CVResult) -> dict:
    gold = np.array([EMOTIONS.index(clips[i].label) for i in result.labelled])
    metrics = classification_metrics(gold, result.oof_probs.argmax(1))
    scores = np.array(result.fold_scores)
    metrics["folds"] = {"weighted_f1_mean": float(scores.mean()), "weighted_f1_std": float(scores.std()),
                        "weighted_f1": [float(s) for s in scores]}
    metrics["n_labelled"] = len(result.labelled)
    metrics["seconds_per_fold"] = float(np.mean(result.seconds_per_fold))
    return rounded(metrics)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def write_reports(clips: list[Clip], result: CVResult, stores: list[str], out: Path) -> dict:
    """metrics.json, plots/*.csv (DVC plots), predictions.csv (+ probabilities)."""
    out = Path(out)
    metrics = cv_metrics(clips, result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    plots = out / "plots"
    predicted = result.oof_probs.argmax(1)
    _write_csv(plots / "confusion.csv", ["actual", "predicted"],
               [[clips[i].label, EMOTIONS[p]] for i, p in zip(result.labelled, predicted)])
    _write_csv(plots / "curves.csv", ["step", "fold", "train_loss", "val_weighted_f1"],
               [[h["epoch"], k, round(h["train_loss"], 5), round(h["val_weighted_f1"], 5)]
                for k, history in enumerate(result.histories) for h in history])
    _write_csv(plots / "per_class_f1.csv", ["emotion", "f1"],
               [[e, metrics["per_class_f1"][e]] for e in EMOTIONS])
    weights = result.weights[result.labelled]
    columns = stores if weights.shape[1] == len(stores) else stores[: weights.shape[1]]
    _write_csv(plots / "modality_weights.csv", ["emotion", "modality", "weight"],
               [[e, m, round(float(weights[predicted == c, j].mean()) if (predicted == c).any() else 0.0, 4)]
                for c, e in enumerate(EMOTIONS) for j, m in enumerate(columns)])
    write_predictions(clips, result, out)
    return metrics


def write_predictions(clips: list[Clip], result: CVResult, out: Path) -> None:
    """MER2025 submission `name,discrete` for candidates (all unlabelled clips when none are
    marked), plus every clip's probabilities (out-of-fold for labelled clips)."""
    rows = {clips[i].name: p for i, p in zip(result.unlabelled, result.unlabelled_probs)}
    candidates = [c.name for c in clips if c.candidate] or [clips[i].name for i in result.unlabelled]
    _write_csv(out / "predictions.csv", ["name", "discrete"],
               [[n, EMOTIONS[int(rows[n].argmax())]] for n in candidates if n in rows])
    all_rows = [(clips[i].name, "labelled_oof", p) for i, p in zip(result.labelled, result.oof_probs)]
    all_rows += [(clips[i].name, "unlabelled", p) for i, p in zip(result.unlabelled, result.unlabelled_probs)]
    _write_csv(out / "predictions_proba.csv", ["name", "kind", *EMOTIONS],
               [[n, kind, *[round(float(x), 5) for x in p]] for n, kind, p in sorted(all_rows)])
