"""Store screening inside each training fold (`train.screen_stores`): a store that cannot
predict its own held-out clips better than the class frequencies do is masked out of that
fold's models.

Why: attention gates and an L2 penalty turn a noise store down but never off. On the demo
(video and text stores are noise by construction) every fusion kind with all stores scored
below Whisper alone, and on RAVDESS the subtitle store (two fixed sentences) carries nothing.
Screening is the MERTools habit of choosing stores by how they score alone, done where it is
honest: on the training fold's clips only, by an inner group-aware split, never on the clips
the fold is scored on.

The test for each store: a multinomial logistic regression (scikit-learn, C = train.linear_c)
on the store alone, standardised on the inner training part, cross-fitted over
SCREEN_FOLDS inner folds (on a seeded sample of SCREEN_MAX_CLIPS clips when the fold has
more); the store stays when its out-of-fold log loss is below that of the
inner training part's class frequencies on the same clips by more than MIN_GAIN_SE standard
errors of the per-clip difference. A log loss, not an F1, so a store that shifts
probabilities the right way without changing the argmax still counts. When no
store passes, the one with the lowest log loss stays. Fewer speakers than inner folds: one
speaker is held out per inner fold (data/splits.py). When the fold's clips cannot be split (too
few clips), every store stays, and the log says so.

Masking, not removing: a screened-out store is hidden from the fold's models as a missing
modality is (its mask column off), except on a clip that has none of the kept stores, which
keeps its own mask so every clip still gets an answer from the models. Checkpoints record the
kept stores (`kept_stores`) and `mer predict` masks the same way.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from pipeline.config import TrainConfig
from pipeline.data.splits import fold_indices
from pipeline.fusion.features import Features, Standardizer
from pipeline.refine.weak import one_blas_thread

log = logging.getLogger(__name__)

SCREEN_FOLDS = 3  # inner folds: three fits per store per outer fold
SCREEN_MAX_CLIPS = 1000  # training folds larger than this are screened on a seeded sample of this many clips
# a store stays when its mean per-clip log-loss gain over the class frequencies exceeds this many
# standard errors of that mean: a noise store's gain is about 0 and passes 0 about half the time
MIN_GAIN_SE = 1.0


@dataclass
class Screening:
    kept: list[str]
    log_loss: dict[str, float]  # store -> inner out-of-fold log loss (a store no inner fold could test: absent)
    prior_log_loss: dict[str, float]  # store -> the class frequencies' log loss on the same clips
    why: str = ""  # when nothing was tested: the reason
    none_passed: bool = False  # no store beat the class frequencies: the lowest log loss stayed


def screen(features: Features, rows: np.ndarray, labels: np.ndarray, groups: list[str | None],
           c: float, seed: int) -> Screening:
    """Which of `features.stores` carry signal on the training `rows` (`labels`: class indices,
    `groups`: their speakers or None), by the module docstring's test. One store after another:
    two at once on two threads took longer (1.44 s against 1.30 s, five video stores, 1,000 clips).
    NumPy's BLAS runs on one thread meanwhile (weak.one_blas_thread): 0.3 s per outer fold on
    RAVDESS's three stores instead of 3.0 s, the same stores kept."""
    stores = list(features.stores)
    if len(stores) < 2:
        return Screening(stores, {}, {}, "one store: nothing to screen")
    if len(rows) > SCREEN_MAX_CLIPS:  # a seeded sample: enough to see a signal, at a bounded cost
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), SCREEN_MAX_CLIPS, replace=False))
        rows, labels, groups = rows[pick], labels[pick], [groups[i] for i in pick]
    try:
        inner = fold_indices([str(y) for y in labels], groups, k=SCREEN_FOLDS, seed=seed, warn=False)
    except ValueError as err:
        return Screening(stores, {}, {}, f"the training fold cannot be split ({err})")

    with one_blas_thread():
        results = _cross_fitted_losses(features, rows, labels, inner, c, seed)
    losses, prior_losses, passed = {}, {}, []
    for store, (loss, gain) in results.items():
        losses[store], prior_losses[store] = float(loss.mean()), float((loss + gain).mean())
        if gain.mean() > MIN_GAIN_SE * gain.std() / np.sqrt(len(gain)):
            passed.append(store)
    if not losses:
        return Screening(stores, {}, {}, "no store had clips in every inner fold")
    kept = [s for s in stores if s not in losses or s in passed]
    if not kept:
        return Screening([min(losses, key=losses.get)], losses, prior_losses, none_passed=True)
    return Screening(kept, losses, prior_losses)


def _cross_fitted_losses(features: Features, rows: np.ndarray, labels: np.ndarray, inner: list, c: float,
                         seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per store, per held-out clip that has it: the regression's log loss and its gain over the
    class frequencies'. Each inner fold's stores are standardised as the trainer does (the
    Standardizer, fitted on the inner training part's present rows). A store no inner fold could
    test is absent."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in features.stores}
    for tr, va in inner:
        norm = Standardizer(features, rows[tr])
        x_tr, x_va = norm(features, rows[tr]), norm(features, rows[va])
        for j, store in enumerate(features.stores):
            fit, held = features.mask[rows[tr], j], features.mask[rows[va], j]
            y_fit, y_held = labels[tr][fit], labels[va][held]
            if not len(y_held) or len(np.unique(y_fit)) < 2:
                continue
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=ConvergenceWarning)
                model = LogisticRegression(C=c, max_iter=300, random_state=seed).fit(x_tr[store][fit].numpy(), y_fit)
            probs = model.predict_proba(x_va[store][held].numpy())
            col = {k: i for i, k in enumerate(model.classes_)}
            hit = np.array([probs[i, col[y]] if y in col else 0.0 for i, y in enumerate(y_held)])
            freq = np.bincount(y_fit, minlength=int(labels.max()) + 1) / len(y_fit)
            loss = -np.log(np.clip(hit, 1e-6, 1))
            parts[store].append((loss, -np.log(np.clip(freq[y_held], 1e-6, 1)) - loss))
    return {s: (np.concatenate([loss for loss, _ in p]), np.concatenate([gain for _, gain in p]))
            for s, p in parts.items() if p}


def screen_fold(features: Features, rows: np.ndarray, labels: np.ndarray, groups: list[str | None],
                cfg: TrainConfig, fold: int, say: Callable[..., None]) -> list[str]:
    """The stores outer fold `fold` keeps: every one with train.screen_stores off; else `screen` on its
    training rows (C = train.linear_c), said in one line."""
    if not cfg.screen_stores:
        return list(features.stores)
    result = screen(features, rows, labels, groups, cfg.linear_c, cfg.seed + fold)
    (log.warning if result.none_passed else say)("fold %d store screening: %s", fold, describe(result))
    return result.kept


def screened_mask(mask: np.ndarray, stores: list[str], kept: list[str]) -> np.ndarray:
    """`mask` with the screened-out stores' columns off, except on rows that would be left with
    no modality: those keep their own mask."""
    keep = np.array([s in kept for s in stores])
    out = mask & keep
    empty = ~out.any(axis=1)
    out[empty] = mask[empty]
    return out


def apply(features: Features, kept: list[str]) -> Features:
    """The same features with the screened-out stores masked (screened_mask)."""
    if len(kept) == len(features.stores):
        return features
    return replace(features, mask=screened_mask(features.mask, features.stores, kept))


def describe(result: Screening) -> str:
    if result.why:
        return f"every store kept ({result.why})"
    parts = [f"{s} {result.log_loss[s]:.3f}" + ("" if s in result.kept else " (out)")
             for s in result.log_loss]
    prior = np.mean(list(result.prior_log_loss.values()))
    if result.none_passed:
        return (f"no store predicts its held-out training clips better than the class frequencies ({prior:.3f}; "
                f"labels this noisy or this few clips?), so the lowest, {result.kept[0]}, is kept; inner log loss "
                + ", ".join(f"{s} {v:.3f}" for s, v in result.log_loss.items()))
    return f"kept {', '.join(result.kept)}; inner log loss {', '.join(parts)} against the class frequencies' {prior:.3f}"
