"""What a fold model's checkpoint (`models/fusion/fold<k>[-<member>].pt`) holds, written by
the trainer and read by `mer predict`: plain tensors and primitives only, so
`torch.load(..., weights_only=True)` reads it and a checkpoint from anyone stays data."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.fusion.features import Features
from pipeline.store import StoreReader


def fold_checkpoint(fold: dict, cfg: TrainConfig, features: Features, k: int, prior: np.ndarray,
                    member: int | str = 0, blend_weight: float = 1.0, kept_stores: list[str] | None = None) -> dict:
    """Outer fold `k`'s ensemble member `member` (a number, or "linear" for the linear member), as
    train_fold or fit_linear returned it; `blend_weight`: its share of the fold's answer;
    `kept_stores`: the stores the fold's screening kept (train.screen_stores; None: all)."""
    return {
        "member": member,
        "head": "linear" if fold.get("linear") else "fusion",  # predict rebuilds LinearFusion or the fusion kind
        "blend_weight": float(blend_weight),
        "model": fold["model"].state_dict(),
        "optimizer": fold["optimizer"].state_dict() if fold["optimizer"] is not None else {},
        "config": asdict(cfg),
        "epoch": fold["epoch"],
        "best_metric": fold["val_f1"] if cfg.epoch_choice == "inner_split" else None,  # fixed: nothing chosen
        "fold": k,
        "stores": features.stores,
        "kept_stores": list(features.stores if kept_stores is None else kept_stores),  # the others are masked
        "dims": {s: int(features.inputs[s].shape[1]) for s in features.stores},
        "speaker_norm": features.speaker_normalized,  # predict normalises new clips per speaker the same way
        "prior": torch.from_numpy(prior.copy()),  # the answer for a clip with no usable modality
        "selected_on": "inner split of the training fold" if cfg.epoch_choice == "inner_split" else "fixed: train.epochs",
        "normalizer": {s: [torch.from_numpy(m), torch.from_numpy(sd)] for s, (m, sd) in fold["norm"].stats.items()},
    }


def load_folds(models: Path) -> list[dict]:
    """Every fold model of a `models/fusion` folder, read as data (weights_only)."""
    paths = sorted(Path(models).glob("fold*.pt"))
    if not paths:
        raise FileNotFoundError(f"no fold*.pt in {models}; train first (`dvc repro train`)")
    return [torch.load(p, weights_only=True, map_location="cpu") for p in paths]


def store_settings(path: Path) -> str:
    """What a store's values depend on, as canonical JSON: its extractor, model and options (the
    store's fingerprint inputs without the library versions, which move values by float noise at
    most). "" for a store without them (switched off, or written before they were kept). The
    train stage saves them per store in every checkpoint; `mer predict` compares its fresh stores."""
    with StoreReader(path) as reader:
        inputs = reader.attrs.get("fingerprint_inputs_json")
    if not inputs:
        return ""
    settings = json.loads(inputs)
    settings.pop("versions", None)
    return json.dumps(settings, sort_keys=True)


def settings_change(trained: str, now: str) -> str:
    """The options that differ between two `store_settings` (empty when they agree or one is unknown)."""
    if not trained or not now or trained == now:
        return ""
    before, after = json.loads(trained), json.loads(now)
    keys = sorted({*before.get("params", {}), *after.get("params", {})})
    changed = [f"{k}: {before.get('params', {}).get(k)!r} -> {after.get('params', {}).get(k)!r}" for k in keys
               if before.get("params", {}).get(k) != after.get("params", {}).get(k)]
    changed += [f"{k} differs" for k in ("extractor", "model") if before.get(k) != after.get(k)]
    return "; ".join(changed) or "its settings differ"
