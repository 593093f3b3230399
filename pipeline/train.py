"""The fusion trainer: stratified (group-aware) k-fold cross-validation on cached features.

One model per fold, selected on the fold's validation weighted F1 (the MER metric).
Labelled clips get out-of-fold predictions; unlabelled and candidate clips get the
average of the fold models. Refined labels and pseudo-labels, when given, are used in
training folds only: validation is always scored against the original gold labels.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.fusion import build_fusion
from pipeline.labels import EMOTIONS, EMOTION_INDEX
from pipeline.manifest import Clip
from pipeline.splits import fold_indices
from pipeline.store import StoreReader

log = logging.getLogger(__name__)


@dataclass
class Features:
    names: list[str]
    inputs: dict[str, np.ndarray]  # store -> (N, D) float32
    mask: np.ndarray  # (N, M) bool, columns in `stores` order
    stores: list[str]


def load_features(clips: list[Clip], stores: list[str], feature_dir: str | Path = "features") -> Features:
    names = [c.name for c in clips]
    inputs, masks = {}, []
    for store in stores:
        path = Path(feature_dir) / f"{store}.h5"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: params key 'train.stores' names {store!r}; "
                                    f"run `dvc repro extract@{store}` or remove it from train.stores")
        with StoreReader(path) as reader:
            values, mask = reader.read("utterance", names)
        inputs[store] = np.nan_to_num(values.astype(np.float32))
        masks.append(mask)
    return Features(names, inputs, np.stack(masks, axis=1), list(stores))


def select(features: Features, stores: list[str]) -> Features:
    """The same clips with only `stores` (for single-modality models and ablations)."""
    cols = [features.stores.index(s) for s in stores]
    return Features(features.names, {s: features.inputs[s] for s in stores}, features.mask[:, cols], list(stores))


class Standardizer:
    """Per-store mean/std fitted on the present rows of the training fold only."""

    def __init__(self, features: Features | None = None, rows: np.ndarray | None = None):
        self.stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if features is None:
            return  # filled by from_stats
        for j, store in enumerate(features.stores):
            present = rows[features.mask[rows, j]]
            x = features.inputs[store][present] if len(present) else features.inputs[store][:1] * 0
            self.stats[store] = (x.mean(axis=0), x.std(axis=0) + 1e-6)

    @classmethod
    def from_stats(cls, stats: dict[str, list[torch.Tensor]]) -> "Standardizer":
        """Rebuild from a checkpoint's `normalizer` entry."""
        norm = cls()
        norm.stats = {s: (m.numpy(), sd.numpy()) for s, (m, sd) in stats.items()}
        return norm

    def __call__(self, features: Features, rows: np.ndarray) -> dict[str, torch.Tensor]:
        out = {}
        for j, store in enumerate(features.stores):
            mean, std = self.stats[store]
            x = (features.inputs[store][rows] - mean) / std
            out[store] = torch.from_numpy(np.where(features.mask[rows, j:j + 1], x, 0).astype(np.float32))
        return out


def _set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="weighted", labels=list(range(len(EMOTIONS))), zero_division=0))


def train_fold(features: Features, train_rows: np.ndarray, train_targets: np.ndarray, val_rows: np.ndarray,
               val_gold: np.ndarray, cfg: TrainConfig, seed: int) -> dict:
    """Train one fold; returns the best state, its epoch and score, and the per-epoch history."""
    _set_seed(seed)
    norm = Standardizer(features, train_rows)
    dims = {s: features.inputs[s].shape[1] for s in features.stores}
    model = build_fusion(dims, cfg.model).to(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    counts = np.bincount(train_targets.argmax(1), minlength=len(EMOTIONS)).astype(np.float32)
    class_weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(EMOTIONS))
    loss_weight = class_weight if cfg.class_balance == "weights" else None
    x_train, m_train = norm(features, train_rows), torch.from_numpy(features.mask[train_rows])
    x_val, m_val = norm(features, val_rows), torch.from_numpy(features.mask[val_rows])
    y_train = torch.from_numpy(train_targets.astype(np.float32))
    generator = torch.Generator().manual_seed(seed)
    best = {"val_f1": -1.0, "epoch": -1, "state": None}
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        order = _epoch_order(train_targets, class_weight, cfg.class_balance, generator)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            mask = _drop_modalities(m_train[idx], cfg.model.modality_dropout, generator)
            logits, _ = model({k: v[idx] for k, v in x_train.items()}, mask)
            loss = _soft_cross_entropy(logits, y_train[idx], loss_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        val_probs, _ = predict(model, x_val, m_val)
        val_f1 = _weighted_f1(val_gold, val_probs.argmax(1))
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_weighted_f1": val_f1})
        if val_f1 > best["val_f1"]:
            best = {"val_f1": val_f1, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(best["state"])
    return {"model": model, "optimizer": optimizer, "norm": norm, "history": history, **best}


def _epoch_order(targets: np.ndarray, class_weight: torch.Tensor, balance: str,
                 generator: torch.Generator) -> torch.Tensor:
    if balance == "sampler":  # balanced sampling: draw clips with probability ~ 1/class size
        weights = class_weight[torch.from_numpy(targets.argmax(1))]
        return torch.multinomial(weights, len(targets), replacement=True, generator=generator)
    return torch.randperm(len(targets), generator=generator)


def _drop_modalities(mask: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Hide modalities at random so the model learns to answer without them; keep >= 1 per clip."""
    if p <= 0:
        return mask
    keep = torch.rand(mask.shape, generator=generator) >= p
    dropped = mask & keep
    empty = ~dropped.any(dim=1)
    dropped[empty] = mask[empty]
    return dropped


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    log_probs = torch.log_softmax(logits, dim=1)
    per_class = -targets * log_probs
    if weight is not None:
        per_class = per_class * weight
    return per_class.sum(dim=1).mean()


@torch.inference_mode()
def predict(model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, 6) and modality weights (N, M). A clip with no modality at all
    gets the prior of an all-missing input: it is given one zero modality to attend to."""
    model.eval()
    mask = mask.clone()
    empty = ~mask.any(dim=1)
    mask[empty, 0] = True
    logits, weights = model(inputs, mask)
    return torch.softmax(logits, dim=1).numpy(), weights.numpy()


def one_hot(labels: list[str]) -> np.ndarray:
    out = np.zeros((len(labels), len(EMOTIONS)), np.float32)
    out[np.arange(len(labels)), [EMOTION_INDEX[x] for x in labels]] = 1
    return out


@dataclass
class CVResult:
    oof_probs: np.ndarray  # (n_labelled, 6)
    labelled: list[int]  # rows of the labelled clips
    unlabelled_probs: np.ndarray  # (n_unlabelled, 6), fold average
    unlabelled: list[int]
    weights: np.ndarray  # (N, M) modality weights, oof for labelled, fold average otherwise
    fold_scores: list[float]
    histories: list[list[dict]]
    checkpoints: list[dict]
    seconds_per_fold: list[float]


def cross_validate(clips: list[Clip], features: Features, cfg: TrainConfig,
                   refined: dict[str, np.ndarray] | None = None,
                   pseudo: dict[str, np.ndarray] | None = None) -> CVResult:
    """k-fold CV. `refined`: name -> soft target for labelled clips; `pseudo`: name -> soft
    target for unlabelled clips. Both only ever enter training rows."""
    torch.set_num_threads(cfg.threads)
    if cfg.model.kind == "single":
        if cfg.model.single not in features.stores:
            raise ValueError(f"params key 'train.model.single' is {cfg.model.single!r}; "
                             f"choose one of train.stores: {', '.join(features.stores)}")
        features = select(features, [cfg.model.single])
    labelled = [i for i, c in enumerate(clips) if c.label]
    unlabelled = [i for i, c in enumerate(clips) if not c.label]
    gold = np.array([EMOTION_INDEX[clips[i].label] for i in labelled])
    targets = one_hot([clips[i].label for i in labelled])
    if cfg.use_refined and refined:
        targets = np.stack([refined.get(clips[i].name, targets[k]) for k, i in enumerate(labelled)])
    pseudo_rows = [i for i in unlabelled if cfg.use_pseudo and pseudo and clips[i].name in pseudo]
    folds = fold_indices([clips[i].label for i in labelled], [clips[i].group for i in labelled],
                         k=cfg.folds, seed=cfg.seed)
    oof = np.zeros((len(labelled), len(EMOTIONS)), np.float32)
    n_mod = len(features.stores)
    weights = np.zeros((len(clips), n_mod), np.float32)
    unl_probs = np.zeros((len(unlabelled), len(EMOTIONS)), np.float32)
    result = CVResult(oof, labelled, unl_probs, unlabelled, weights, [], [], [], [])
    lab_rows = np.array(labelled)
    for k, (tr, va) in enumerate(folds):
        start = time.perf_counter()
        train_rows = np.concatenate([lab_rows[tr], np.array(pseudo_rows, dtype=int)])
        train_targets = np.concatenate([targets[tr]] + ([np.stack([pseudo[clips[i].name] for i in pseudo_rows])]
                                                        if pseudo_rows else []))
        fold = train_fold(features, train_rows, train_targets, lab_rows[va], gold[va], cfg, cfg.seed + k)
        x_val = fold["norm"](features, lab_rows[va])
        oof[va], weights[lab_rows[va]] = predict(fold["model"], x_val, torch.from_numpy(features.mask[lab_rows[va]]))
        if unlabelled:
            rows = np.array(unlabelled)
            probs, w = predict(fold["model"], fold["norm"](features, rows), torch.from_numpy(features.mask[rows]))
            unl_probs += probs / len(folds)
            weights[rows] += w / len(folds)
        result.fold_scores.append(fold["val_f1"])
        result.histories.append(fold["history"])
        result.checkpoints.append(_checkpoint(fold, cfg, features, k))
        result.seconds_per_fold.append(time.perf_counter() - start)
        log.info("fold %d: best epoch %d, val weighted F1 %.4f (%.1fs)", k, fold["epoch"], fold["val_f1"],
                 result.seconds_per_fold[-1])
    return result


def _checkpoint(fold: dict, cfg: TrainConfig, features: Features, k: int) -> dict:
    """Plain tensors and primitives only, so `torch.load(..., weights_only=True)` reads it."""
    return {
        "model": fold["model"].state_dict(),
        "optimizer": fold["optimizer"].state_dict(),
        "config": asdict(cfg),
        "epoch": fold["epoch"],
        "best_metric": fold["val_f1"],
        "fold": k,
        "stores": features.stores,
        "dims": {s: int(features.inputs[s].shape[1]) for s in features.stores},
        "normalizer": {s: [torch.from_numpy(m), torch.from_numpy(sd)] for s, (m, sd) in fold["norm"].stats.items()},
    }


def config_with(cfg: TrainConfig, **model_changes) -> TrainConfig:
    """A copy of `cfg` with some model settings changed (for ablations)."""
    return replace(cfg, model=replace(cfg.model, **model_changes))
