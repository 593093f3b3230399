"""Cross-validation folds that respect groups (speaker, actor, dialogue).

The same speaker in train and test inflates scores, so whenever the manifest carries a
`group`, every splitter of the pipeline (cross-fitting, cross-validation, benchmarks)
splits by it. Clips without a group count as groups of their own.

Stratification needs a class with at least k clips; when every class is smaller (a tiny
dataset), the folds are drawn without it (KFold / GroupKFold, shuffled) and a warning says so.

Fewer speakers than folds (SAVEE's 4 actors, TESS's 2, at the default 5 folds): one speaker is
held out per fold instead (k = the number of groups, leave-one-speaker-out), as the folds the
params ask for cannot be made and a user running defaults expects a run, not a stop (it stopped
with "4 groups cannot make 5 group-aware folds"). One speaker alone: no split can hold a speaker
out, so clips are split. `fold_groups` says which happened; the trainer warns and reports it.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter

import numpy as np

from pipeline.errors import TrainError
from pipeline.labels import EMOTIONS

log = logging.getLogger(__name__)


def group_ids(groups: list[str | None]) -> np.ndarray:
    """One id per clip: its group, or a group of its own when it has none."""
    return np.array([g if g is not None else f"__clip_{i}" for i, g in enumerate(groups)])


def fold_groups(groups: list[str | None], k: int) -> int:
    """How many folds a split of clips with these `groups` makes for `k` asked: k without groups;
    min(k, the number of groups) with them (a clip naming none is a group of its own); 1 when the
    clips name one group only, which the split then ignores (clips are split)."""
    return min(k, len(set(group_ids(groups)))) if any(g is not None for g in groups) else k


def fold_indices(labels: list[str], groups: list[str | None], k: int = 5,
                 seed: int = 0, warn: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) index pairs, stratified by label and, when present, grouped: k of them,
    or one per group when the clips name fewer (module docstring)."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(labels)
    if len(y) < k:
        raise ValueError(f"{len(y)} labelled clips cannot make {k} folds")
    if (grouped := fold_groups(groups, k)) == 1:  # one speaker: nothing to hold out but clips
        groups = [None] * len(groups)
    else:
        k = grouped
    stratify = max(Counter(labels).values()) >= k
    if not stratify and warn:
        log.warning("every class has fewer than %d clips: folds are not stratified by class", k)
    if any(g is not None for g in groups):
        ids = group_ids(groups)
        if not stratify:
            return list(GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, ids))
        return _quiet_split(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed), y, ids)
    if not stratify:
        return list(KFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y))))
    return _quiet_split(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed), y, None)


def _quiet_split(splitter, y: np.ndarray, ids: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stratified splits without scikit-learn's per-call "least populated class" warning:
    each stage names its small classes once (warn_small_classes), not once per split it makes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [(tr, va) for tr, va in splitter.split(np.zeros(len(y)), y, ids)]


def training_folds(labels: list[str], groups: list[str | None], k: int, seed: int, what: str,
                   warn: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fusion trainer's folds (fold_indices); folds that cannot be made stop with one line
    naming params key `train.folds`, prefixed by `what`."""
    try:
        return fold_indices(labels, groups, k=k, seed=seed, warn=warn)
    except ValueError as err:
        raise TrainError(f"{what}: {err}; lower params key 'train.folds' (now {k}) or label more clips") from None


def inner_split(labels: list[str], groups: list[str | None], folds: int, seed: int,
                fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(inner train, inner validation) positions within one outer training fold: about 1/`folds` held out."""
    k = min(folds, len(labels))  # fewer groups: fold_indices holds one out per fold, or splits one group's clips
    if k < 2:
        raise TrainError(f"fold {fold}: {len(labels)} training clips cannot be split to choose the epoch; "
                         "lower params key 'train.folds' or label more clips")
    return training_folds(labels, groups, k, seed, f"fold {fold}, inner split", warn=False)[0]


def warn_small_classes(labels: list[str], k: int, warn=log.warning, key: str = "train.folds",
                       effect: str = "their F1 is noisy") -> None:
    """Name once the classes with fewer labelled clips than folds (some folds score them on no clip),
    and the classes with none (nothing learns them; the reports' macro and per-class F1 leave them out)."""
    counts = {e: labels.count(e) for e in EMOTIONS}
    absent = [e for e, n in counts.items() if n == 0]
    if absent and len(absent) < len(counts):
        warn("class(es) %s have no labelled clip: no classifier learns them from labels, and macro and "
             "per-class F1 leave them out", ", ".join(absent))
    small = {e: n for e, n in counts.items() if 0 < n < k}
    if small:
        warn("class(es) %s have fewer labelled clips than params key '%s' (%d): some folds score them on no clip, "
             "and %s", ", ".join(f"{e} ({n})" for e, n in small.items()), key, k, effect)
