"""How good are the LLM's zero-shot labels? Scored against the gold labels of the manifest.

`reports/llm/metrics.json` (a DVC metric) holds, over the labelled clips that have a
subtitle: accuracy, weighted F1 (the MER2025 metric), macro F1, per-class precision /
recall / F1 / support, the confusion matrix, and the majority-class baseline on the same
clips, so a number can be read against chance. Labelled clips the store lacks are counted
but not scored: `failed` where the extraction recorded a failure (the LLM errored or answered
garbage: `<store>.failures.jsonl` beside the store), `no_subtitle` for the rest (the LLM was
never asked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.labels import EMOTION_INDEX, EMOTIONS, scored_classes
from pipeline.manifest import Clip
from pipeline.store import StoreError, StoreReader
from pipeline.tables import rounded


def label_store_metrics(clips: list[Clip], store: str | Path, key: str = "utterance") -> dict[str, Any]:
    """Scores of a store of six-class probabilities (argmax) against the clips' gold labels."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labelled = [c for c in clips if c.label]
    with StoreReader(store) as reader:
        if reader.disabled:
            return {"enabled": False, "labelled": len(labelled), "scored": 0}
        probs, present = reader.read(key, [c.name for c in labelled])
    failed = _failed_names(Path(store))
    lacking = [c.name for c, p in zip(labelled, present) if not p]
    counts = {"labelled": len(labelled), "scored": int(present.sum()),
              "no_subtitle": sum(n not in failed for n in lacking), "failed": sum(n in failed for n in lacking)}
    if not present.any():  # no labelled clip has a label in the store: nothing to score
        return counts
    if probs.shape[1:] != (len(EMOTIONS),):
        raise StoreError(f"{store}: key {key!r} has shape {probs.shape[1:]}, expected ({len(EMOTIONS)},)")
    gold = np.array([EMOTION_INDEX[c.label] for c in labelled], dtype=np.int64)[present]
    predicted = probs[present].argmax(axis=1)
    classes = list(range(len(EMOTIONS)))
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=classes, zero_division=0)
    majority = np.bincount(gold, minlength=len(EMOTIONS)).argmax()
    out: dict[str, Any] = {  # the headline first: `dvc exp show` keeps this order
        "weighted_f1": float(f1_score(gold, predicted, average="weighted", labels=classes, zero_division=0)),
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", labels=scored_classes(gold),
                                   zero_division=0)),  # over the classes the lines have
        "majority_class": {"label": EMOTIONS[majority], "accuracy": float(np.mean(gold == majority)),
                           "weighted_f1": float(f1_score(gold, np.full_like(gold, majority), average="weighted",
                                                         labels=classes, zero_division=0))},
        "per_class": {name: {"precision": float(p), "recall": float(r),  # f1 null: no line has the class
                             "f1": float(f) if s else None, "support": int(s)}
                      for name, p, r, f, s in zip(EMOTIONS, precision, recall, f1, support)},
        "predicted_per_class": {name: int(n) for name, n in
                                zip(EMOTIONS, np.bincount(predicted, minlength=len(EMOTIONS)))},
        "confusion": {"labels": list(EMOTIONS),
                      "rows_gold_cols_predicted": confusion_matrix(gold, predicted, labels=classes).tolist()},
        **counts,
    }
    return rounded(out)



def _failed_names(store: Path) -> set[str]:
    """The clips the extraction of `store` recorded as failed (its `<stem>.failures.jsonl`)."""
    path = store.with_name(f"{store.stem}.failures.jsonl")
    if not path.is_file():
        return set()
    return {json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
