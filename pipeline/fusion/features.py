"""What the fusion trainer reads: every clip's utterance vector per store, where each is usable,
optionally centred per speaker, and the per-store standardisation fitted on training rows only.

Speaker normalisation (`train.speaker_norm`). A voice or a face carries who speaks as much as
how they feel, and a classifier trained on some speakers reads part of a new speaker's
identity as emotion. Centring each store's vectors on the speaker's own mean (and scaling by
the speaker's spread) removes that, the standard step for unseen-speaker speech emotion
recognition. It uses features only, never labels: each speaker's statistics come from all of
that speaker's clips with the modality, labelled or not, the scored and predicted ones too,
exactly as a batch of a new speaker's clips would be normalised at prediction time. `auto`
(the default) normalises when every clip names its group and groups hold at least
MIN_SPEAKER_CLIPS clips (median), i.e. when groups are speakers, not dialogues or missing;
otherwise, when the voice store (`train.speaker_stores`, GE2E embeddings) has clips with a
voice, it normalises per pseudo-speaker found by clustering voices (pipeline/fusion/speakers.py);
`on` stops with the reason when neither holds; `off` never normalises. Measured in the
README ("Fusion": speaker normalisation).
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace
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
    speaker_normalized: bool = False  # each store centred and scaled per group (train.speaker_norm)
    speaker_groups: str = ""  # what the groups were: "named" (the dataset's) | "voice clusters" | ""
    fold_groups: list[str | None] | None = None  # voice clusters: the finest, for folds when no clip names a group


# a speaker's mean from fewer clips than this is mostly their emotions' mean, not their voice's;
# groups of a dialogue corpus (MELD train: a median of 9 utterances per dialogue) fall below it
MIN_SPEAKER_CLIPS = 20


def named_speakers(clips: list[Clip]) -> tuple[bool, str]:
    """Whether the clips' own groups are speakers (every clip names one; a median of
    MIN_SPEAKER_CLIPS clips each), and why (for the log)."""
    sizes = Counter(c.group for c in clips if c.group)
    missing = [c.name for c in clips if not c.group]
    median = statistics.median(sizes.values()) if sizes else 0
    if missing:
        return False, f"{len(missing)} of {len(clips)} clips name no group (speaker), e.g. {missing[0]}"
    if median < MIN_SPEAKER_CLIPS:
        return False, (f"its {len(sizes)} groups hold a median of {median:g} clips, under {MIN_SPEAKER_CLIPS}: "
                       "groups this small (dialogues, not speakers) give no speaker's mean")
    return True, f"{len(sizes)} speakers (groups), a median of {median:g} clips each"


def speaker_groupings(clips: list[Clip], mode: str, voices: Path | None) -> tuple[list[list[str | None]], str, str]:
    """(groupings, kind, why): the groupings to normalise by ([] for none), "named" or "voice
    clusters", and the reason for the log. `voices`: the voice store (None: not configured)."""
    from pipeline.fusion.speakers import voice_groupings

    if mode == "off":
        return [], "", "train.speaker_norm is off"
    named, why = named_speakers(clips)
    if named:
        return [[c.group for c in clips]], "named", why
    if voices is None:
        why += "; no voice store to find speakers by (train.speaker_stores is empty)"
    elif not voices.is_file():
        raise FileNotFoundError(f"{voices} not found: params key 'train.speaker_stores' names {voices.stem!r}; "
                                f"run `dvc repro extract@{voices.stem}` or set train.speaker_stores: []")
    else:
        with StoreReader(voices) as reader:  # empty: none present; a non-finite row: not present
            embeddings, present = reader.read("utterance", [c.name for c in clips])
        embeddings = embeddings.reshape(len(clips), -1)
        groupings, what = voice_groupings(embeddings, present, MIN_SPEAKER_CLIPS, [c.label for c in clips])
        if groupings:
            return groupings, "voice clusters", f"{why}, so speakers are found by voice: {what}"
        why += f"; {voices}: {what}"
    if mode == "on":
        raise TrainError(f"params key 'train.speaker_norm' is on, but {why}; name each clip's speaker in a "
                         "`group` column (label, subtitle or candidate file) or set train.speaker_norm: auto")
    return [], "", why


def voice_store(speaker_stores: list[str], feature_dir: str | Path = "features") -> Path | None:
    """The voice store of `train.speaker_stores` ([] or one name), or None."""
    return Path(feature_dir) / f"{speaker_stores[0]}.h5" if speaker_stores else None


def load_features(clips: list[Clip], stores: list[str], feature_dir: str | Path = "features",
                  dims: dict[str, int] | None = None, speaker_norm: str = "off",
                  voices: Path | None = None) -> Features:
    """The `utterance` vector of every clip from each store, and where each is usable.

    A store no clip has (empty, or every row not present) is left out with a warning, unless
    `dims` (a trained model's input widths) is given: then it is read as all-missing zeros of
    that width, so the model masks it. Rows with non-finite values count as missing.
    `speaker_norm` (auto | on | off): see the module docstring; the decision is logged.
    `voices`: the voice store that pseudo-speakers are found in when the clips name none.
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
    features = Features(names, inputs, np.stack(masks, axis=1), kept, dropped)
    groupings, kind, why = speaker_groupings(clips, speaker_norm, voices)
    (log.info if groupings or speaker_norm != "off" else log.debug)(
        "speaker normalisation %s: %s", f"on ({kind})" if groupings else "off", why)
    if not groupings:
        return features
    return replace(normalize_by_groupings(features, groupings), speaker_groups=kind,
                   fold_groups=groupings[-1] if kind == "voice clusters" else None)


def normalize_by_groupings(features: Features, groupings: list[list[str | None]]) -> Features:
    """`normalize_per_speaker` under each grouping, averaged (pseudo-speakers at several
    resolutions: pipeline/fusion/speakers.py); one grouping is exactly normalize_per_speaker."""
    runs = [normalize_per_speaker(features, groups) for groups in groupings]
    if len(runs) == 1:
        return runs[0]
    inputs = {s: np.mean([r.inputs[s] for r in runs], axis=0).astype(np.float32) for s in features.stores}
    return replace(runs[0], inputs=inputs)


def normalize_per_speaker(features: Features, groups: list[str | None]) -> Features:
    """Each store's present rows centred on their group's mean and scaled by its spread.

    A group with fewer than MIN_SPEAKER_CLIPS rows of a store (a speaker seldom on camera), and a
    clip without a group (no voice to cluster it by), is standardised with the statistics of all
    present rows instead, so it lands on the same scale.
    The spread is floored at a thousandth of the store's overall spread, so a dimension constant
    within one speaker stays 0 instead of dividing by nothing."""
    codes = np.unique(np.array([g or "" for g in groups]), return_inverse=True)[1]
    unnamed = np.array([not g for g in groups])
    inputs = {}
    for j, store in enumerate(features.stores):
        x, present = features.inputs[store].astype(np.float64), features.mask[:, j]
        if not present.any():  # a store the clips lack (read as zeros for a trained model): nothing to centre
            inputs[store] = features.inputs[store]
            continue
        all_mean, all_std = x[present].mean(axis=0), x[present].std(axis=0)
        out = np.zeros_like(x)
        for code in np.unique(codes[present]):
            rows = present & (codes == code)
            if rows.sum() >= MIN_SPEAKER_CLIPS and not unnamed[rows].any():
                mean, std = x[rows].mean(axis=0), x[rows].std(axis=0)
            else:
                mean, std = all_mean, all_std
            out[rows] = (x[rows] - mean) / np.maximum(std, 1e-3 * all_std + 1e-8)
        inputs[store] = out.astype(np.float32)
    return replace(features, inputs=inputs, speaker_normalized=True)


def select(features: Features, stores: list[str]) -> Features:
    """The same clips with only `stores` (for single-modality models and ablations)."""
    missing = [s for s in stores if s not in features.stores]
    if missing:
        raise TrainError(f"store(s) {', '.join(missing)} carry nothing on this dataset (see the warning above); "
                         f"stores with clips: {', '.join(features.stores)}")
    cols = [features.stores.index(s) for s in stores]
    return Features(features.names, {s: features.inputs[s] for s in stores}, features.mask[:, cols], list(stores),
                    speaker_normalized=features.speaker_normalized, speaker_groups=features.speaker_groups,
                    fold_groups=features.fold_groups)


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
