"""Weak supervision on arrays: weak classifiers, cross-fitting, and the two label aggregators.

`CompleteClassifier` wraps any probabilistic classifier in scikit-learn's estimator API so
that `predict_proba` always has one column per class of a fixed list (the six EMOTIONS, in
their order), even when a cross-fitting fold lacks a class: the missing columns are 0.
`make_weak` builds the two weak learners the refine stage knows from their params
sections; `cross_fit` scores every clip out of fold; `precision_weights` + `weighted_vote`
and `dawid_skene` combine the sources. pipeline/refine/vote.py wires them to stores and params.
"""

from __future__ import annotations

import warnings

from typing import Any, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.config import WEAK_CLASSIFIERS, DawidSkeneConfig, LightGBMConfig, LogRegConfig  # noqa: F401 - re-exported
from pipeline.devices import usable_cpus
from pipeline.errors import MerError


class FoldError(MerError, ValueError):
    """Too few labelled clips or groups for the folds asked for."""


class CompleteClassifier(ClassifierMixin, BaseEstimator):
    """`estimator` fitted on the classes present; `predict_proba` over all of `classes`.

    classes: the column order to return (e.g. EMOTIONS); None means the sorted labels
    seen in `fit`. A fold with a single class gives a constant prediction.
    """

    def __init__(self, estimator: Any = None, classes: Sequence[Any] | None = None):
        self.estimator = estimator
        self.classes = classes

    def fit(self, X: Any, y: Any) -> "CompleteClassifier":
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        present = np.unique(y)
        self.classes_ = np.unique(y) if self.classes is None else np.asarray(list(self.classes))
        unknown = sorted(set(present.tolist()) - set(self.classes_.tolist()))
        if unknown:
            raise ValueError(f"labels {unknown} are not among classes {self.classes_.tolist()}")
        if len(present) == 1:
            self.estimator_ = None  # a model needs two classes; predict the one seen
        else:
            self.estimator_ = clone(self._inner()).fit(X, y)
        fitted = present if self.estimator_ is None else np.asarray(self.estimator_.classes_)
        self.columns_ = np.array([self.classes_.tolist().index(c) for c in fitted.tolist()])
        return self

    def _inner(self) -> Any:
        if self.estimator is not None:
            return self.estimator
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        out = np.zeros((X.shape[0], len(self.classes_)), dtype=np.float64)
        if self.estimator_ is None:
            out[:, self.columns_[0]] = 1.0
        else:
            out[:, self.columns_] = self.estimator_.predict_proba(X)
        return out

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags


def logreg(cfg: LogRegConfig, seed: int) -> Any:
    """StandardScaler + multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=cfg.C, max_iter=cfg.max_iter,
                                                              random_state=seed))


def _cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, where the OS says)."""
    return usable_cpus()


def lightgbm(cfg: LightGBMConfig, seed: int) -> Any:
    """LightGBM trees, deterministic for a seed. At most one thread per usable core: OpenMP threads wait
    by spinning, so more threads than cores is many times slower; the probabilities do not depend
    on the count (col-wise histograms keep each feature's sums on one thread; tested)."""
    from lightgbm import LGBMClassifier

    return LGBMClassifier(n_estimators=cfg.n_estimators, learning_rate=cfg.learning_rate,
                          num_leaves=cfg.num_leaves, min_child_samples=cfg.min_child_samples,
                          colsample_bytree=cfg.colsample_bytree, subsample_freq=0,
                          n_jobs=min(cfg.n_jobs, _cores()), random_state=seed, deterministic=True,
                          force_col_wise=True, verbose=-1)


def make_weak(name: str, classes: Sequence[str], seed: int, logreg_cfg: LogRegConfig = LogRegConfig(),
              lightgbm_cfg: LightGBMConfig = LightGBMConfig()) -> CompleteClassifier:
    """A fresh weak classifier `name` (one of WEAK_CLASSIFIERS) with columns in `classes`."""
    if name == "logreg":
        return CompleteClassifier(logreg(logreg_cfg, seed), classes)
    if name == "lightgbm":
        return CompleteClassifier(lightgbm(lightgbm_cfg, seed), classes)
    raise ValueError(f"unknown weak classifier {name!r}; known: {', '.join(WEAK_CLASSIFIERS)}")


def one_blas_thread() -> Any:
    """Context: NumPy's BLAS on one thread, for the small scikit-learn regressions (the linear
    member, store screening, the refine stage's weak logistic regressions).

    Their products are small ((clips, width) x (width, 6)): on 2 cores with torch loaded, a
    scikit-learn lbfgs fit took 2-7x as long on OpenBLAS's two threads as on one (280 x 2,048:
    0.16-0.23 s against 0.03 s; 2,400 x 5,545: 0.53 s against 0.27-0.30 s; the same iterations;
    README "Fusion": training speed). The refine stage's 5-fold logistic regressions: RAVDESS
    Whisper 3.3 s -> 0.4 s, MELD text 7.1 s -> 1.6 s. threadpoolctl comes with scikit-learn.
    It lives here because the train stage already depends on pipeline/refine; in devices.py a
    change would re-run every extract stage of a user's DVC graph."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def cross_fit(model: CompleteClassifier, X: np.ndarray, mask: np.ndarray, gold: np.ndarray,
              groups: Sequence[str | None], k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold class probabilities for every clip the store has (`mask`).

    gold: index into `model.classes` per clip, -1 when unlabelled. The labelled clips in
    `mask` are split into k stratified folds (grouped when `groups` has any value): each
    is scored by the model fitted on the other k-1 folds; an unlabelled clip gets the
    mean of the k fold models. No clip is ever scored by a model that saw it.
    Returns (probs (N, C), scored (N,) = mask); rows of clips not scored are 0.
    """
    from pipeline.data.splits import fold_indices

    classes = np.asarray(list(model.classes))
    labelled = np.flatnonzero(mask & (gold >= 0))
    unlabelled = np.flatnonzero(mask & (gold < 0))
    try:
        folds = fold_indices([str(g) for g in gold[labelled]], [groups[i] for i in labelled], k=k, seed=seed)
    except ValueError as err:
        raise FoldError(str(err)) from err
    probs = np.zeros((len(gold), len(classes)), dtype=np.float64)
    with one_blas_thread():  # small products: OpenBLAS's threads cost more than they give
        for train, val in folds:
            fitted = clone(model).fit(X[labelled[train]], classes[gold[labelled[train]]])
            probs[labelled[val]] = fitted.predict_proba(X[labelled[val]])
            if len(unlabelled):
                probs[unlabelled] += fitted.predict_proba(X[unlabelled]) / len(folds)
    return probs, mask.copy()


def precision_weights(probs: np.ndarray, present: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """(S, C): per-class precision of each source's argmax on labelled clips, (tp+1)/(n+2).

    probs (S, N, C) source probabilities, present (S, N) bool, gold (N,) index or -1.
    """
    n_sources, _, n_classes = probs.shape
    weights = np.zeros((n_sources, n_classes))
    for s in range(n_sources):
        seen = present[s] & (gold >= 0)
        predicted, truth = probs[s, seen].argmax(axis=1), gold[seen]
        for c in range(n_classes):
            said = predicted == c
            weights[s, c] = ((truth[said] == c).sum() + 1) / (said.sum() + 2)
    return weights


def weighted_vote(probs: np.ndarray, present: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, C): sum over present sources of probabilities times per-class weights, normalised.

    Rows of clips no source voted on are 0.
    """
    score = np.einsum("snc,sc,sn->nc", probs, weights, present.astype(np.float64))
    total = score.sum(axis=1, keepdims=True)
    return np.where(total > 0, score / np.where(total > 0, total, 1), 0.0)


def dawid_skene(probs: np.ndarray, present: np.ndarray, gold: np.ndarray, smoothing: float = 1.0,
                max_iter: int = 100, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dawid-Skene EM over each source's argmax vote, gold clamped on labelled clips.

    Returns (posterior (N, C) from the votes alone, confusion (S, C, C) = P(vote j | truth c),
    prior (C,) over the true classes).
    Labelled clips' truths stay fixed at gold while fitting; unlabelled clips' truths are
    the latent variables. The posterior of a labelled clip leaves its gold out, so it can
    disagree with it. Rows of clips no source voted on are 0.
    """
    n_classes = probs.shape[2]
    hard = _hard_votes(probs, present)
    labelled = gold >= 0
    truth = np.zeros((len(gold), n_classes))
    truth[labelled, gold[labelled]] = 1.0
    voted = hard.sum(axis=0)
    free = ~labelled & (voted.sum(axis=1) > 0)  # latent truths; clips without votes stay rows of 0
    truth[free] = voted[free] / voted[free].sum(axis=1, keepdims=True)  # start at the vote shares
    confusion = np.full((probs.shape[0], n_classes, n_classes), 1.0 / n_classes)
    for _ in range(max_iter):
        new, prior = _m_step(truth, hard, smoothing)
        truth[free] = _ds_posterior(hard[:, free], new, prior)
        moved = np.abs(new - confusion).max()
        confusion = new
        if moved < tol or labelled.all():
            break
    posterior = _ds_posterior(hard, confusion, prior)
    return np.where(present.any(axis=0)[:, None], posterior, 0.0), confusion, prior


def dawid_skene_crowdkit(probs: np.ndarray, present: np.ndarray, gold: np.ndarray, smoothing: float = 1.0,
                        max_iter: int = 100, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`dawid_skene` with crowd-kit's DawidSkene doing the EM: each present argmax vote is a
    (task, worker, label) row, gold goes in as `true_labels` (clamped). crowd-kit smooths only
    its first M-step, so an unseen (truth, vote) cell ends at 0 and vetoes a class; the returned
    confusions and prior are therefore one more M-step on crowd-kit's fitted truths with
    `smoothing` counts, as in ours. The votes-only posterior of every clip (crowd-kit has none
    for gold-clamped tasks) comes from them. crowd-kit's tolerance is on its evidence lower
    bound, ours on the confusion entries."""
    import pandas as pd
    from crowdkit.aggregation import DawidSkene

    n_classes = probs.shape[2]
    source, clip = np.nonzero(present)
    data = pd.DataFrame({"task": clip, "worker": source, "label": probs.argmax(axis=2)[source, clip]})
    labelled = np.flatnonzero(gold >= 0)
    model = DawidSkene(n_iter=max_iter, tol=tol)
    with warnings.catch_warnings():  # crowd-kit 1.4.2 on pandas 3: inplace= deprecation notes per call
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        model.fit(data, true_labels=pd.Series(gold[labelled], index=labelled))
    truth = np.zeros((probs.shape[1], n_classes))  # fitted P(truth) per clip; rows of unvoted clips stay 0
    fitted = model.probas_.reindex(columns=range(n_classes)).fillna(0.0)
    truth[fitted.index.to_numpy(dtype=int)] = fitted.to_numpy()
    truth[labelled] = np.eye(n_classes)[gold[labelled]]  # gold clamped, voted on or not
    hard = _hard_votes(probs, present)
    confusion, prior = _m_step(truth, hard, smoothing)
    posterior = _ds_posterior(hard, confusion, prior)
    return np.where(present.any(axis=0)[:, None], posterior, 0.0), confusion, prior


def vote_precision(confusion: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """(S, C): P(truth c | source votes c) from Dawid-Skene confusions and the class prior."""
    joint = confusion * prior[None, :, None]  # (S, truth, vote)
    diagonal = np.diagonal(joint, axis1=1, axis2=2)
    return diagonal / joint.sum(axis=1)


def _hard_votes(probs: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(S, N, C) one-hot argmax votes, zero where the source did not vote."""
    return np.eye(probs.shape[2])[probs.argmax(axis=2)] * present[..., None]


def _m_step(truth: np.ndarray, hard: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """Dawid-Skene M-step with `smoothing` counts: (confusion (S, truth, vote), prior (C,))."""
    counts = np.einsum("nc,snj->scj", truth, hard) + smoothing
    prior = truth.sum(axis=0) + smoothing
    return counts / counts.sum(axis=2, keepdims=True), prior / prior.sum()


def _ds_posterior(hard: np.ndarray, confusion: np.ndarray, prior: np.ndarray) -> np.ndarray:
    logp = np.log(prior)[None, :] + np.einsum("snj,scj->nc", hard, np.log(confusion))
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=1, keepdims=True)
