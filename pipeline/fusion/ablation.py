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
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip
from pipeline.fusion.report import classification_metrics
from pipeline.fusion.models import FUSION_MODELS
from pipeline.fusion.train import Features, config_with, cross_validate, select
from pipeline.tables import markdown_table

log = logging.getLogger(__name__)


def variants(cfg: TrainConfig, stores: list[str]) -> list[tuple[str, TrainConfig, list[str]]]:
    """(row name, config, stores) for every row of the table."""
    rows = [(f"{cfg.model.kind} (all)", cfg, stores)]
    if len(stores) > 1:
        rows += [(f"{cfg.model.kind} without {s}", cfg, [x for x in stores if x != s]) for s in stores]
    rows += [(f"{kind} (all)", config_with(cfg, kind=kind), stores)
             for kind in FUSION_MODELS if kind != cfg.model.kind]
    rows += [(f"single: {s}", config_with(cfg, kind="single", single=s), [s]) for s in stores]
    return rows


def run_ablation(clips: list[Clip], features: Features, cfg: TrainConfig,
                 refined: dict | None = None, pseudo: dict | None = None, fold_refiner=None) -> list[dict]:
    scored = [i for i, c in enumerate(clips) if c.label and features.mask[i].any()]
    gold = np.array([EMOTIONS.index(clips[i].label) for i in scored])
    rows = []
    for name, variant, stores in variants(cfg, features.stores):
        result = cross_validate(clips, select(features, stores), replace(variant, stores=stores), refined, pseudo,
                                quiet=bool(rows), fold_lines=False,  # dataset warnings once, then a line per row
                                fold_refiner=fold_refiner)
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
    return markdown_table(
        ["variant", "weighted F1", "accuracy", "macro F1", "fold std", "clips scored", "by the prior", "s/fold"],
        ([r["variant"], f"{r['weighted_f1']:.4f}", f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}",
          f"{r['fold_std']:.4f}", r["scored"], r["prior"], r["seconds_per_fold"]] for r in rows))
