"""Cross-validation folds that respect groups (speaker, actor, dialogue).

The same speaker in train and test inflates scores, so whenever the manifest carries a
`group`, every splitter of the pipeline (cross-fitting, cross-validation, benchmarks)
splits by it. Clips without a group count as groups of their own.

Stratification needs a class with at least k clips; when every class is smaller (a tiny
dataset), the folds are drawn without it (KFold / GroupKFold, shuffled) and a warning says so.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

log = logging.getLogger(__name__)


def group_ids(groups: list[str | None]) -> np.ndarray:
    """One id per clip: its group, or a group of its own when it has none."""
    return np.array([g if g is not None else f"__clip_{i}" for i, g in enumerate(groups)])


def fold_indices(labels: list[str], groups: list[str | None], k: int = 5,
                 seed: int = 0, warn: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, validation) index pairs, stratified by label and, when present, grouped."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(labels)
    if len(y) < k:
        raise ValueError(f"{len(y)} labelled clips cannot make {k} folds")
    stratify = max(Counter(labels).values()) >= k
    if not stratify and warn:
        log.warning("every class has fewer than %d clips: folds are not stratified by class", k)
    if any(g is not None for g in groups):
        ids = group_ids(groups)
        n_groups = len(set(ids))
        if n_groups < k:
            raise ValueError(f"{n_groups} groups cannot make {k} group-aware folds")
        if not stratify:
            return list(GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, ids))
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return [(tr, va) for tr, va in splitter.split(np.zeros(len(y)), y, ids)]
    if not stratify:
        return list(KFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y))))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, va) for tr, va in splitter.split(np.zeros(len(y)), y)]
