"""Ablation: the same CV protocol with each modality removed, each baseline fusion, and each
single modality, in one table (ECMF's paper has none).

Every row is scored on the same clips: the labelled clips the full model is scored on. A
clip that a row's stores lack entirely (its only modality was removed) is answered by the
training prior in that row, as the submission would answer it, and counted in `prior`.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from pipeline.config import TrainConfig
from pipeline.errors import TrainError
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip
from pipeline.fusion.report import classification_metrics
from pipeline.fusion.models import FUSION_MODELS
from pipeline.fusion.train import Features, config_with, cross_validate, select
from pipeline.tables import markdown_table

log = logging.getLogger(__name__)


def variants(cfg: TrainConfig, stores: list[str]) -> list[tuple[str, TrainConfig, list[str]]]:
    """(row name, config, stores) for every row of the table, the configured model first.

    One store with features: one row, as every fusion kind trains as `single` on it (train.py);
    rows of each kind would repeat it under other names. `train.model.kind: single`: no "without"
    rows, since the model reads its one store whatever the others are."""
    singles = [(f"single: {s}", config_with(cfg, kind="single", single=s), [s]) for s in stores]
    if len(stores) == 1:
        return [(f"single: {stores[0]} (the one store with features: every fusion kind trains as this)",
                 *singles[0][1:])]
    if cfg.model.kind == "single":
        first = [(name, variant, kept) for name, variant, kept in singles if kept == [cfg.model.single]]
        return [*first, *[(f"{kind} (all)", config_with(cfg, kind=kind), stores) for kind in FUSION_MODELS],
                *[row for row in singles if row not in first]]
    rows = [(f"{cfg.model.kind} (all)", cfg, stores)]
    rows += [(f"{cfg.model.kind} without {s}", cfg, [x for x in stores if x != s]) for s in stores]
    rows += [(f"{kind} (all)", config_with(cfg, kind=kind), stores)
             for kind in FUSION_MODELS if kind != cfg.model.kind]
    return rows + singles


def run_ablation(clips: list[Clip], features: Features, cfg: TrainConfig,
                 refined: dict | None = None, pseudo: dict | None = None, fold_refiner=None) -> list[dict]:
    """One row per variant. A variant that cannot train (its stores' labelled clips make no folds)
    is a row that says why, not the end of the table; the configured model's own failure stops it,
    as it stops train."""
    scored = [i for i, c in enumerate(clips) if c.label and features.mask[i].any()]
    gold = np.array([EMOTIONS.index(clips[i].label) for i in scored])
    rows = []
    for name, variant, stores in variants(cfg, features.stores):
        try:
            result = cross_validate(clips, select(features, stores), replace(variant, stores=stores), refined, pseudo,
                                    quiet=bool(rows), fold_lines=False,  # dataset warnings once, then a line per row
                                    fold_refiner=fold_refiner)
        except TrainError as err:
            if not rows:
                raise
            log.warning("ablate: %s: not trained: %s", name, err)
            rows.append({"variant": name, "stores": stores, "skipped": str(err), "scored": len(scored)})
            continue
        answer = dict(zip(result.labelled, result.oof_probs.argmax(1)))
        prior = int(result.prior.argmax())
        metrics = classification_metrics(gold, np.array([answer.get(i, prior) for i in scored]))
        rows.append({"variant": name, "stores": stores, "weighted_f1": round(metrics["weighted_f1"], 4),
                     "accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
                     "fold_std": round(float(np.std(result.fold_scores)), 4), "scored": len(scored),
                     "prior": sum(i not in answer for i in scored),
                     "seconds_per_fold": round(float(np.mean(result.seconds_per_fold)), 2)})
        log.info("ablate: %s: weighted F1 %.4f on %d clips (%d by the prior), %.1fs per fold", name,
                 metrics["weighted_f1"], len(scored), rows[-1]["prior"], rows[-1]["seconds_per_fold"])
    return rows


def to_markdown(rows: list[dict]) -> str:
    def cells(r: dict) -> list:
        if "skipped" in r:  # no scores: the reason in their place
            return [r["variant"], f"not trained: {r['skipped']}", "", "", "", r["scored"], "", ""]
        return [r["variant"], f"{r['weighted_f1']:.4f}", f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}",
                f"{r['fold_std']:.4f}", r["scored"], r["prior"], r["seconds_per_fold"]]

    return markdown_table(
        ["variant", "weighted F1", "accuracy", "macro F1", "fold std", "clips scored", "by the prior", "s/fold"],
        (cells(r) for r in rows))
