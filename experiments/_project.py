"""What the experiment scripts share: a project read back, its stores, and its two scores.

A bench-heldout folder is what `python -m pipeline.bench.heldout` leaves under
`build/heldout/<corpus>/`: `project/` (params.yaml, data/manifest.jsonl, features/*.h5, after
`dvc repro train`) and `truth.csv` (the candidates' labels, outside the dataset root). Any
other project folder (this repository after `make repro`, `.`) reads as one without
candidates' labels: CV only. Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.bench.heldout import _csv as read_truth, score  # the bench's own truth.csv reader
from pipeline.config import TrainConfig, load_params, train_config
from pipeline.fusion.features import Features, voice_store
from pipeline.fusion.member import weighted_f1
from pipeline.fusion.train import CVResult, load_features
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip, read_manifest


@dataclass
class Project:
    folder: Path  # holds params.yaml, data/, features/
    cfg: TrainConfig  # the project's train section, `stores` narrowed to those that carry features
    clips: list[Clip]
    features: Features  # speaker-normalised as the project's params say
    truth: dict[str, str]  # candidate name -> label; {} without a truth.csv
    extra: list[str]  # stores read beside train.stores (load_project's `extra` not already among them)

    def features_for(self, clips: list[Clip]) -> Features:
        """The stores read again for `clips` (the same names, some labels hidden): the voice
        clustering's guard reads the labelled clips' labels, so a hidden clip's must not be there."""
        return _load(self.folder, clips, self.cfg)


def project_folder(base: Path) -> Path:
    folder = base / "project" if (base / "project" / "params.yaml").is_file() else base
    if not (folder / "data" / "manifest.jsonl").is_file():
        raise SystemExit(f"{base}: no project here (project/params.yaml and data/manifest.jsonl); run "
                         "`make bench-heldout` first (or `make repro` for this repository's own, `.`)")
    return folder


def project_config(base: Path) -> TrainConfig:
    """The project's train section as params.yaml has it, before any store is read."""
    cfg = train_config(load_params(project_folder(base) / "params.yaml"))
    if cfg.use_refined or cfg.use_pseudo:  # cross_validate here gets no refined targets: say so, not a silent other run
        raise SystemExit(f"{base}: train.use_refined / use_pseudo are on; these scripts train on the gold labels only")
    return cfg


def load_project(base: Path, stores: list[str] | None = None, speaker_stores: list[str] | None = None,
                 extra: list[str] = ()) -> Project:
    """`stores`: these instead of train.stores; `extra`: read beside them (those not among them);
    `speaker_stores`: instead of train.speaker_stores ([] where the corpus has no voices, as MELD's text)."""
    folder, cfg = project_folder(base), project_config(base)
    stores = stores or cfg.stores
    extra = [s for s in extra if s not in stores]
    cfg = replace(cfg, stores=[*stores, *extra],
                  speaker_stores=cfg.speaker_stores if speaker_stores is None else speaker_stores)
    clips = read_manifest(folder / "data" / "manifest.jsonl")
    features = _load(folder, clips, cfg)
    truth = read_truth(base / "truth.csv") if (base / "truth.csv").is_file() else {}
    return Project(folder, replace(cfg, stores=features.stores), clips, features, truth, extra)


def _load(folder: Path, clips: list[Clip], cfg: TrainConfig) -> Features:
    return load_features(clips, cfg.stores, folder / "features", speaker_norm=cfg.speaker_norm,
                         voices=voice_store(cfg.speaker_stores, folder / "features"))


def cv_score(result: CVResult, clips: list[Clip]) -> float:
    """Out-of-fold weighted F1 on the labelled clips (what `metrics.json` reports)."""
    gold = np.array([EMOTIONS.index(clips[i].label) for i in result.labelled])
    return weighted_f1(gold, result.oof_probs.argmax(1))


def heldout_score(result: CVResult, clips: list[Clip], truth: dict[str, str]) -> float:
    """Weighted F1 of the candidates' answers against truth.csv; a candidate without one counts as
    wrong. NaN without a truth.csv."""
    if not truth:
        return float("nan")
    pred = {clips[i].name: EMOTIONS[int(p.argmax())] for i, p in zip(result.unlabelled, result.unlabelled_probs)}
    return score(pred, truth, len(pred))["weighted_f1"]
