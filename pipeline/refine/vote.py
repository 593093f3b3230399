"""Label refinement: weak sources vote, gold labels are corrected and pseudo-labels added.

Sources. Each (feature store, weak classifier) pair is cross-fitted (pipeline.refine.weak): every
labelled clip gets an out-of-fold probability vector, every unlabelled clip the mean of
the k fold models. Label stores (e.g. `llm_labels`, six probabilities in EMOTIONS order)
are used as they are. A clip a store lacks (mask 0) gets no vote from its sources.

Aggregation (`refine.method`), always from the sources alone, never from the gold label:
- weighted_vote: per-class precision of each source's argmax against gold on the labelled
  clips (out of fold, Laplace-smoothed) weights its probabilities; sum, normalise.
- dawid_skene: one confusion matrix per source over its argmax votes, fitted by EM with
  the gold label CLAMPED as the truth on labelled clips (unlabelled clips' truths are the
  latent variables); every clip's posterior is then computed from the votes alone.
- cleanlab: the weighted_vote mixture, and confident learning decides which gold labels are
  wrong (`cleanlab.filter.find_label_issues` on the labelled clips' out-of-fold mixture,
  `refine.cleanlab.filter_by`): per-class thresholds from the data instead of one
  `correct_threshold` (Northcutt et al.).

Decisions. A labelled clip is flagged when the aggregate's argmax differs from gold with
confidence strictly above `correct_threshold` (cleanlab: when confident learning flags it).
Mode hard: its label becomes the argmax; soft: the label stays, its soft label becomes the
mean of gold and the aggregate; drop: it is left out of training (soft label all zeros, the
trainer's mark for "not a training row"; it is still scored against its gold label).
An unlabelled clip gets a pseudo-label when the confidence is strictly above its class's
threshold and at least `min_agreeing_sources` STORES have a source whose argmax agrees
(logreg and lightgbm on the same features are not independent, so they count once).

Outputs. `labels.jsonl`, one JSON object per manifest clip, in manifest order: name,
split, label (gold or null), refined (label or null), soft (6 probabilities in EMOTIONS
order, null when refined is null), aggregate (6, null without votes), confidence (max of
aggregate), changed, pseudo, votes ({source: {label, probs}} for the sources that voted).
`summary.json` (DVC metrics): changes per gold and new class, pseudo-labels per class,
each source's out-of-fold accuracy / macro-F1 and reliability P(truth c | it says c).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError, RefineConfig
from pipeline.labels import EMOTION_INDEX, EMOTIONS, scored_classes
from pipeline.manifest import Clip
from pipeline.store import StoreReader
from pipeline.tables import write_json, write_jsonl
from pipeline.data.splits import warn_small_classes
from pipeline.refine.weak import (FoldError, cross_fit, dawid_skene, dawid_skene_crowdkit, make_weak,
                                  precision_weights, vote_precision, weighted_vote)

log = logging.getLogger(__name__)
@dataclass
class Votes:
    """Every source's probabilities over EMOTIONS for every clip."""

    sources: list[str]  # "store/classifier" or the label store's name
    stores: list[str]  # the store behind each source: the unit of independence
    probs: np.ndarray  # (S, N, 6)
    present: np.ndarray  # (S, N) bool: the source voted on the clip
    skipped: dict[str, str] = field(default_factory=dict)  # source -> why it could not vote


@dataclass
class Refinement:
    names: list[str]
    splits: list[str]
    gold: np.ndarray  # (N,) class index, -1 when unlabelled
    votes: Votes
    aggregate: np.ndarray  # (N, 6) over EMOTIONS, rows of clips without votes are 0
    reliability: np.ndarray  # (S, 6) the per-class weight each source got
    refined: np.ndarray  # (N,) class index, -1 when none
    soft: np.ndarray  # (N, 6), rows of clips without a refined label are 0
    changed: np.ndarray  # (N,) bool
    pseudo: np.ndarray  # (N,) bool
    dropped: np.ndarray | None = None  # (N,) bool: flagged and left out of training (mode drop)

    @property
    def flagged(self) -> np.ndarray:
        """Labelled clips the method found suspect: changed, or dropped."""
        return self.changed | (self.dropped if self.dropped is not None else False)

    @property
    def has_votes(self) -> np.ndarray:
        return self.votes.present.any(axis=0)

    @property
    def confidence(self) -> np.ndarray:
        return self.aggregate.max(axis=1)


def gold_of(clips: list[Clip]) -> np.ndarray:
    """Class index of each clip's label, -1 for clips without one."""
    return np.array([EMOTION_INDEX[c.label] if c.label else -1 for c in clips], dtype=np.int64)


def _store_path(features: Path, store: str, key: str) -> Path:
    path = features / f"{store}.h5"
    if not path.is_file():
        raise ConfigError(f"params key 'refine.{key}' names store {store!r} but {path} does not exist; "
                          f"run `dvc repro extract@{store}` or remove it from refine.{key}")
    return path


def collect_votes(clips: list[Clip], cfg: RefineConfig, features: Path) -> Votes:
    """Cross-fit every (store, classifier) source and read every label store."""
    paths = {s: _store_path(features, s, "stores") for s in cfg.stores}  # fail before any training
    label_paths = {s: _store_path(features, s, "label_stores") for s in cfg.label_stores}
    votes: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    skipped: dict[str, str] = {}
    if paths:  # once for every cross-fitted source, not once per fold split
        warn_small_classes([c.label for c in clips if c.label], cfg.k, log.warning, "refine.k",
                           "their out-of-fold votes are noisy")
    for store, path in paths.items():
        votes += _trained_sources(clips, cfg, store, path, skipped)
    for store, path in label_paths.items():
        probs, present = _label_store(clips, cfg, store, path)
        if present.any():
            votes.append((store, store, probs, present))
        else:
            _carries_nothing(store, "label_stores", skipped)
    if not votes:
        empty = np.zeros((0, len(clips), len(EMOTIONS)))
        return Votes([], [], empty, empty[..., 0].astype(bool), skipped)
    sources, stores, probs, present = zip(*votes)
    return Votes(list(sources), list(stores), np.stack(probs), np.stack(present), skipped)


def _trained_sources(clips: list[Clip], cfg: RefineConfig, store: str, path: Path,
                     skipped: dict[str, str]) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(source, store, out-of-fold probs, scored) for each weak classifier on one store.

    A store whose labelled clips cannot make `k` folds (a tiny demo dataset) gives no
    sources: it is logged and listed in `skipped`, so the pipeline still runs end to end.
    """
    names, gold, groups = [c.name for c in clips], gold_of(clips), [c.group for c in clips]
    with StoreReader(path) as reader:
        X, mask = reader.read(cfg.key, names)
    X = X.reshape(len(names), -1).astype(np.float64)
    if not mask.any():
        return _carries_nothing(store, "stores", skipped)
    out = []
    for name in cfg.classifiers:
        model = make_weak(name, EMOTIONS, cfg.seed, cfg.logreg, cfg.lightgbm)
        try:
            probs, scored = cross_fit(model, X, mask, gold, groups, cfg.k, cfg.seed)
        except FoldError as err:
            log.warning("refine: %s/%s skipped: %s (params key refine.k)", store, name, err)
            skipped[f"{store}/{name}"] = f"{err} (refine.k = {cfg.k})"
            continue
        log.info("%s/%s: %d clips scored", store, name, scored.sum())
        out.append((f"{store}/{name}", store, probs, scored))
    return out


def _carries_nothing(store: str, key: str, skipped: dict[str, str]) -> list:
    """A store no clip has (e.g. LLM labels on a dataset without subtitles) gives no votes: said once."""
    log.warning("refine: store %r (params key refine.%s) carries nothing: no clip has its modality", store, key)
    skipped[store] = "carries nothing: no clip has this store's modality"
    return []


def _label_store(clips: list[Clip], cfg: RefineConfig, store: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities renormalised to sum 1, present) of a store of ready-made labels."""
    with StoreReader(path) as reader:
        probs, mask = reader.read(cfg.key, [c.name for c in clips])
    if not mask.any():
        return np.zeros((len(clips), len(EMOTIONS))), mask
    if probs.shape[1:] != (len(EMOTIONS),):
        raise ConfigError(f"params key 'refine.label_stores': {store!r} key {cfg.key!r} has shape "
                          f"{probs.shape[1:]}, expected ({len(EMOTIONS)},) probabilities over {EMOTIONS}")
    total = probs.astype(np.float64).sum(axis=1, keepdims=True)
    present = mask & (total[:, 0] > 0)
    return np.where(present[:, None], probs / np.where(total > 0, total, 1.0), 0.0), present


def aggregate(votes: Votes, gold: np.ndarray, cfg: RefineConfig) -> tuple[np.ndarray, np.ndarray]:
    """(aggregate (N, 6), reliability (S, 6) = P(truth c | source says c)) by `cfg.method`."""
    if cfg.method == "cleanlab":  # the mixture of weighted_vote; cleanlab flags in decide()
        return aggregate(votes, gold, replace(cfg, method="weighted_vote"))
    if cfg.method == "dawid_skene":
        ds = cfg.dawid_skene
        em = dawid_skene_crowdkit if ds.implementation == "crowdkit" else dawid_skene
        posterior, confusion, prior = em(votes.probs, votes.present, gold, ds.smoothing, ds.max_iter, ds.tol)
        return posterior, vote_precision(confusion, prior)
    weights = precision_weights(votes.probs, votes.present, gold)
    return weighted_vote(votes.probs, votes.present, weights), weights


def agreeing_stores(votes: Votes, label: np.ndarray) -> np.ndarray:
    """(N,) how many distinct stores have a present source whose argmax is `label`."""
    agree = votes.present & (votes.probs.argmax(axis=2) == label[None, :])
    per_store = [agree[[i for i, s in enumerate(votes.stores) if s == store]].any(axis=0)
                 for store in dict.fromkeys(votes.stores)]
    return np.sum(per_store, axis=0)


def decide(clips: list[Clip], votes: Votes, agg: np.ndarray, weights: np.ndarray,
           cfg: RefineConfig) -> Refinement:
    """Apply the thresholds: corrections of labelled clips, pseudo-labels of the others."""
    gold, C = gold_of(clips), len(EMOTIONS)
    has, top, conf = votes.present.any(axis=0), agg.argmax(axis=1), agg.max(axis=1)
    labelled = gold >= 0
    if cfg.method == "cleanlab":
        flagged = labelled & has & (top != gold) & label_issues(gold, agg, labelled & has, cfg.cleanlab.filter_by)
    else:
        flagged = labelled & has & (top != gold) & (conf > cfg.correct_threshold)
    dropped = flagged if cfg.mode == "drop" else np.zeros(len(clips), bool)
    changed = flagged & ~dropped
    thresholds = np.array([cfg.threshold(e) for e in EMOTIONS])
    pseudo = (~labelled & has & (conf > thresholds[top])
              & (agreeing_stores(votes, top) >= cfg.min_agreeing_sources))
    refined = np.where(labelled, gold, np.where(pseudo, top, -1))
    soft = np.zeros((len(clips), C))
    soft[labelled] = np.eye(C)[gold[labelled]]
    if cfg.mode == "hard":
        refined = np.where(changed, top, refined)
        soft[changed] = np.eye(C)[top[changed]]
        soft[pseudo] = np.eye(C)[top[pseudo]]
    elif cfg.mode == "soft":  # gold keeps its name, its probability mass is shared with the sources
        soft[changed] = (soft[changed] + agg[changed]) / 2
        soft[pseudo] = agg[pseudo]
    else:  # drop: gold stays the clip's label for scoring; no training target
        soft[dropped] = 0.0
        soft[pseudo] = np.eye(C)[top[pseudo]]
    return Refinement([c.name for c in clips], [c.split for c in clips], gold, votes, agg, weights,
                      refined, soft, changed, pseudo, dropped)


def label_issues(gold: np.ndarray, agg: np.ndarray, rows: np.ndarray, filter_by: str) -> np.ndarray:
    """(N,) bool: confident learning's label issues among `rows` (cleanlab.filter.find_label_issues).

    Classes no row carries are left out of the problem (cleanlab needs every column to be a
    class with examples); rows whose aggregate is all zeros cannot be judged and are not flagged.
    """
    from cleanlab.filter import find_label_issues

    out = np.zeros(len(gold), bool)
    rows = rows & (agg.sum(axis=1) > 0)
    classes = np.unique(gold[rows])
    if len(classes) < 2:
        return out
    index = {c: i for i, c in enumerate(classes)}
    probs = agg[rows][:, classes]
    probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
    labels = np.array([index[g] for g in gold[rows]])
    out[np.flatnonzero(rows)] = find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1)
    return out


def drop_unreliable(votes: Votes, gold: np.ndarray) -> Votes:
    """Votes without the sources that score no better than the majority class out of fold.

    Measured on the labelled clips each source voted on (weighted F1 of its argmax against the
    constant most frequent gold class on the same clips): a source at or below that baseline (the
    shipped 135M LLM's zero-shot labels, 0.17 against 0.30 on MELD) gets no weight in any method,
    and `summary.json` lists it under `skipped_sources` with both figures.
    """
    from sklearn.metrics import f1_score

    keep, skipped = [], dict(votes.skipped)
    for s, source in enumerate(votes.sources):
        seen = votes.present[s] & (gold >= 0)
        if not seen.any():
            keep.append(s)
            continue
        truth = gold[seen]
        own = f1_score(truth, votes.probs[s, seen].argmax(axis=1), average="weighted", zero_division=0)
        majority = f1_score(truth, np.full_like(truth, np.bincount(truth).argmax()), average="weighted",
                            zero_division=0)
        if own > majority:
            keep.append(s)
        else:
            log.warning("refine: source %s scores weighted F1 %.3f out of fold, not above the majority class "
                        "(%.3f): it gets no weight", source, own, majority)
            skipped[source] = f"below the majority class: weighted F1 {own:.4f} <= {majority:.4f}"
    return Votes([votes.sources[s] for s in keep], [votes.stores[s] for s in keep], votes.probs[keep],
                 votes.present[keep], skipped)


def refine(clips: list[Clip], cfg: RefineConfig, features: Path) -> Refinement:
    """Collect the votes, drop the sources no better than the majority class, aggregate, decide."""
    votes = drop_unreliable(collect_votes(clips, cfg, features), gold_of(clips))
    agg, weights = aggregate(votes, gold_of(clips), cfg)
    return decide(clips, votes, agg, weights, cfg)


def _label(index: int) -> str | None:
    return EMOTIONS[index] if index >= 0 else None


def _probs(row: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in row]


def label_rows(result: Refinement) -> list[dict[str, Any]]:
    """One record per clip, in manifest order (the format of labels.jsonl)."""
    votes, has, conf = result.votes, result.has_votes, result.confidence
    rows = []
    for i, name in enumerate(result.names):
        voted = {src: {"label": EMOTIONS[int(votes.probs[s, i].argmax())], "probs": _probs(votes.probs[s, i])}
                 for s, src in enumerate(votes.sources) if votes.present[s, i]}
        rows.append({
            "name": name, "split": result.splits[i],
            "label": _label(int(result.gold[i])), "refined": _label(int(result.refined[i])),
            "soft": _probs(result.soft[i]) if result.refined[i] >= 0 else None,
            "aggregate": _probs(result.aggregate[i]) if has[i] else None,
            "confidence": round(float(conf[i]), 4) if has[i] else None,
            "changed": bool(result.changed[i]), "pseudo": bool(result.pseudo[i]),
            "dropped": bool(result.dropped[i]) if result.dropped is not None else False, "votes": voted,
        })
    return rows


def _per_class(indices: np.ndarray) -> dict[str, int]:
    return {e: int((indices == c).sum()) for c, e in enumerate(EMOTIONS)}


def _source_scores(result: Refinement, s: int) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score

    seen = result.votes.present[s] & (result.gold >= 0)
    truth, predicted = result.gold[seen], result.votes.probs[s, seen].argmax(axis=1)
    out: dict[str, Any] = {"store": result.votes.stores[s], "labelled_clips": int(seen.sum())}
    if seen.any():
        out["accuracy"] = round(float(accuracy_score(truth, predicted)), 4)
        out["macro_f1"] = round(float(f1_score(truth, predicted, average="macro",
                                               labels=scored_classes(truth), zero_division=0)), 4)
    out["reliability"] = dict(zip(EMOTIONS, _probs(result.reliability[s])))
    return out


def summarize(result: Refinement, cfg: RefineConfig) -> dict[str, Any]:
    """Counts per class and source reliabilities: the stage's DVC metrics."""
    labelled = result.gold >= 0
    return {
        "method": cfg.method, "mode": cfg.mode, "clips": len(result.names),
        "labelled": int(labelled.sum()), "unlabelled": int((~labelled).sum()),
        "without_votes": int((~result.has_votes).sum()),
        "changed": int(result.changed.sum()),
        "dropped": int(result.dropped.sum()) if result.dropped is not None else 0,
        "changed_from": _per_class(np.where(result.changed, result.gold, -1)),
        "changed_to": _per_class(np.where(result.changed, result.aggregate.argmax(axis=1), -1)),
        "pseudo": int(result.pseudo.sum()),
        "pseudo_per_class": _per_class(np.where(result.pseudo, result.refined, -1)),
        "sources": {src: _source_scores(result, s) for s, src in enumerate(result.votes.sources)},
        "skipped_sources": result.votes.skipped,
    }


def write_outputs(result: Refinement, cfg: RefineConfig, labels_path: Path, summary_path: Path) -> dict[str, Any]:
    """labels.jsonl (one JSON object per clip) and summary.json; returns the summary."""
    write_jsonl(labels_path, label_rows(result))
    summary = summarize(result, cfg)
    write_json(summary_path, summary)
    return summary
