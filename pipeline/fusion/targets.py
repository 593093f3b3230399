"""What each training row learns from: gold one-hot, a refined label, or a pseudo-label.

The refine stage (or, with `train.refine_in_folds`, the same method rerun inside each outer
fold) hands the trainer soft targets; this module turns them into the training targets and
counts what they changed, so the log and `metrics.json` say per fold how many training clips
were left out (`refine.mode: drop`, an all-zero target), relabelled, softened or added as
pseudo-labels.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import TrainConfig
from pipeline.labels import EMOTIONS, EMOTION_INDEX
from pipeline.manifest import Clip


def one_hot(labels: list[str]) -> np.ndarray:
    out = np.zeros((len(labels), len(EMOTIONS)), np.float32)
    out[np.arange(len(labels)), [EMOTION_INDEX[x] for x in labels]] = 1
    return out


def training_targets(clips: list[Clip], labelled: list[int], unlabelled: list[int], usable: np.ndarray,
                     cfg: TrainConfig, refined: dict[str, np.ndarray] | None,
                     pseudo: dict[str, np.ndarray] | None) -> tuple[np.ndarray, list[int], np.ndarray | None]:
    """(targets of the labelled clips, pseudo-labelled rows, their targets): gold one-hot unless
    `use_refined` gives a refined target; pseudo rows only with `use_pseudo`."""
    targets = one_hot([clips[i].label for i in labelled])
    if cfg.use_refined and refined:
        targets = np.stack([refined.get(clips[i].name, targets[k]) for k, i in enumerate(labelled)])
    pseudo_rows = [i for i in unlabelled if cfg.use_pseudo and pseudo and clips[i].name in pseudo and usable[i]]
    return targets, pseudo_rows, np.stack([pseudo[clips[i].name] for i in pseudo_rows]) if pseudo_rows else None


def confident_targets(probs: np.ndarray, rows: np.ndarray, threshold: float,
                      max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Self-training's pseudo-labels (`train.self_training`): the `rows` whose top class probability
    reaches `threshold`, each with that class one-hot as its target, and how many reached it
    (more than were kept when the cap binds). With `max_rows`, only that
    many (`train.self_training_max_ratio`), so that a corpus with many candidates per labelled
    clip does not multiply a fold's training time; each class keeps its share of the confident
    rows, its surest first, so the cut does not tilt the pseudo-labels towards the class the
    teacher is surest of (README "Fusion": self-training, measured)."""
    top, cls = probs.max(axis=1), probs.argmax(axis=1)
    sure = np.flatnonzero(top >= threshold)
    confident = len(sure)
    if max_rows is not None and confident > max_rows:
        share = np.zeros(len(probs))  # within its class: (rank + 1) / class size, the surest first
        for c in np.unique(cls[sure]):
            members = sure[cls[sure] == c]
            ranked = members[np.argsort(-top[members], kind="stable")]
            share[ranked] = np.arange(1, len(ranked) + 1) / len(ranked)
        sure = np.sort(sure[np.lexsort((sure, -top[sure], share[sure]))[:max_rows]])
    return rows[sure], np.eye(len(EMOTIONS), dtype=np.float32)[cls[sure]], confident


def trains(targets: np.ndarray) -> np.ndarray:
    """(N,) bool: the rows that train. An all-zero target is refine.mode drop's mark for a clip
    left out of training (it is still scored against its gold label)."""
    return targets.sum(axis=1) > 0


def target_changes(gold: np.ndarray, targets: np.ndarray, pseudo_rows: int) -> dict[str, int]:
    """How one fold's training targets differ from its gold labels (`gold`: class indices)."""
    kept = trains(targets)
    moved = kept & (targets.argmax(axis=1) != gold)
    softened = kept & ~moved & (targets.max(axis=1) < 1 - 1e-6)
    return {"training_clips": int(kept.sum()), "left_out": int((~kept).sum()), "relabelled": int(moved.sum()),
            "softened": int(softened.sum()), "pseudo_labelled": int(pseudo_rows)}


def describe(changes: dict[str, int]) -> str:
    """'412 labelled clips (38 left out, 0 relabelled, 0 softened by refinement) + 12 pseudo-labelled'."""
    return (f"{changes['training_clips']} labelled clips ({changes['left_out']} left out, "
            f"{changes['relabelled']} relabelled, {changes['softened']} softened by refinement) "
            f"+ {changes['pseudo_labelled']} pseudo-labelled")
