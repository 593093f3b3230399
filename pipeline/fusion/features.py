"""What the fusion trainer reads: every clip's utterance vector per store, where each is usable,
and the per-store standardisation fitted on training rows only."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import TrainError
from pipeline.manifest import Clip
from pipeline.store import StoreReader

log = logging.getLogger(__name__)


@dataclass
class Features:
    names: list[str]
    inputs: dict[str, np.ndarray]  # store -> (N, D) float32
    mask: np.ndarray  # (N, M) bool, columns in `stores` order
    stores: list[str]
    dropped: list[str] = field(default_factory=list)  # stores named but carrying nothing, left out


def load_features(clips: list[Clip], stores: list[str], feature_dir: str | Path = "features",
                  dims: dict[str, int] | None = None) -> Features:
    """The `utterance` vector of every clip from each store, and where each is usable.

    A store no clip has (empty, or every row not present) is left out with a warning, unless
    `dims` (a trained model's input widths) is given: then it is read as all-missing zeros of
    that width, so the model masks it. Rows with non-finite values count as missing.
    """
    names = [c.name for c in clips]
    inputs, masks, kept, dropped = {}, [], [], []
    for store in stores:
        path = Path(feature_dir) / f"{store}.h5"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: params key 'train.stores' names {store!r}; "
                                    f"run `dvc repro extract@{store}` or remove it from train.stores")
        with StoreReader(path) as reader:
            values, mask = reader.read("utterance", names)
        values = values.reshape(len(names), -1).astype(np.float32)
        if dims is not None and values.shape[1] != dims[store]:
            if mask.any():
                raise TrainError(f"{path}: vectors of width {values.shape[1]}, but the model was trained on "
                                 f"{dims[store]}; re-extract with the params the model was trained with")
            values = np.zeros((len(names), dims[store]), np.float32)
        finite = np.isfinite(values).all(axis=1)
        if (mask & ~finite).any():
            log.warning("%s: %d clips with non-finite values are treated as missing this modality",
                        path, int((mask & ~finite).sum()))
        mask = mask & finite
        if not mask.any() and dims is None:
            log.warning("store %r carries nothing (no clip has its modality): training goes on without it",
                        store)
            dropped.append(store)
            continue
        inputs[store] = np.where(mask[:, None], values, 0).astype(np.float32)
        masks.append(mask)
        kept.append(store)
    if not kept:
        raise TrainError(f"no store of params key 'train.stores' ({', '.join(stores)}) holds any clip: "
                         "the dataset has none of their modalities; name stores this dataset has")
    return Features(names, inputs, np.stack(masks, axis=1), kept, dropped)


def select(features: Features, stores: list[str]) -> Features:
    """The same clips with only `stores` (for single-modality models and ablations)."""
    missing = [s for s in stores if s not in features.stores]
    if missing:
        raise TrainError(f"store(s) {', '.join(missing)} carry nothing on this dataset (see the warning above); "
                         f"stores with clips: {', '.join(features.stores)}")
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
