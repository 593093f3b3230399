"""DVC stage `train`: cached features -> k-fold fusion models, metrics, plots, predictions."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.config import Params, load_params, refine_config, train_config
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip, read_manifest
from pipeline.stages import entry_point


def read_refined(path: Path | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Soft targets from the refine stage: (labelled clip -> target, unlabelled clip -> pseudo target)."""
    if path is None or not path.is_file():
        return {}, {}
    return targets_of([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()])


def targets_of(rows: list[dict]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(labelled clip -> target, unlabelled clip -> pseudo target) from refine's label rows
    (labels.jsonl, pipeline/refine/vote.py: label_rows)."""
    refined, pseudo = {}, {}
    for row in rows:
        if row.get("refined") is None:
            continue  # an unlabelled clip that got no pseudo-label
        if row.get("dropped"):  # flagged by refine.mode drop: all zeros, the trainer's "not a training row"
            target = np.zeros(len(EMOTIONS), np.float32)
        else:
            target = np.asarray(row.get("soft") or np.eye(len(EMOTIONS))[EMOTIONS.index(row["refined"])],
                                dtype=np.float32)
        if row.get("pseudo"):
            pseudo[row["name"]] = target
        elif row.get("label"):
            refined[row["name"]] = target
    return refined, pseudo


def fold_refiner(clips: list[Clip], params: Params, features: Path) -> Callable[[set[str]], tuple[dict, dict]]:
    """The refine stage's method rerun with the labels of `hidden` clips withheld (they count as
    unlabelled, and their own pseudo-labels are discarded), for `train.refine_in_folds`: an
    outer fold's training labels are then refined by sources that never saw the labels it is
    scored on. Results are kept per hidden set (the ablation's variants share folds)."""
    from pipeline.refine.vote import label_rows, refine

    cfg, done = refine_config(params), {}

    def refine_without(hidden: set[str]) -> tuple[dict, dict]:
        key = frozenset(hidden)
        if key not in done:
            seen = [replace(c, label=None, split="unlabelled") if c.name in hidden else c for c in clips]
            refined, pseudo = targets_of(label_rows(refine(seen, cfg, features)))
            done[key] = refined, {n: t for n, t in pseudo.items() if n not in hidden}
        return done[key]

    return refine_without


@entry_point
def main(argv: list[str] | None = None) -> None:
    import torch

    from pipeline.fusion.checkpoint import store_settings
    from pipeline.fusion.models import check_kind
    from pipeline.fusion.report import write_reports
    from pipeline.fusion.features import voice_store
    from pipeline.fusion.train import cross_validate, load_features, train_device

    parser = argparse.ArgumentParser(prog="mer train", description=__doc__)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("models", type=Path, help="folder for fold checkpoints")
    parser.add_argument("reports", type=Path, help="folder for metrics.json, plots/, predictions.csv")
    parser.add_argument("--refined", type=Path, help="refined labels (JSON lines) from the refine stage")
    parser.add_argument("--features", type=Path, default=Path("features"))
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = train_config(params)
    train_device(cfg.device)  # cuda without a GPU stops here, before any store is read
    check_kind(cfg.model.kind)
    clips = read_manifest(args.manifest)
    features = load_features(clips, cfg.stores, args.features, speaker_norm=cfg.speaker_norm,
                             voices=voice_store(cfg.speaker_stores, args.features))
    refined, pseudo = read_refined(args.refined)
    result = cross_validate(clips, features, cfg, refined, pseudo,
                            fold_refiner=fold_refiner(clips, params, args.features))
    args.models.mkdir(parents=True, exist_ok=True)
    for old in args.models.glob("fold*.pt"):
        old.unlink()
    # what each store's values depend on: `mer predict` refuses fresh stores made otherwise
    settings = {store: store_settings(Path(args.features) / f"{store}.h5") for store in result.stores}
    for ckpt in result.checkpoints:  # fold<k>.pt, or fold<k>-<member>.pt for an ensemble; predict averages them all
        suffix = f"-{ckpt['member']}" if cfg.ensemble > 1 or ckpt["head"] == "linear" else ""
        torch.save({**ckpt, "store_settings": settings}, args.models / f"fold{ckpt['fold']}{suffix}.pt")
    metrics = write_reports(clips, result, args.reports)
    cands = metrics["candidates"]
    notes = [f"{metrics['n_labelled']} labelled clips scored out of fold"]
    if metrics["excluded_no_modality"]:
        notes.append(f"{metrics['excluded_no_modality']} left out: no usable modality")
    if metrics["folds_grouped_by"] == "voice clusters":
        notes.append("folds grouped by voice clusters (no group column)")
    elif metrics["folds_grouped_by"] == "one speaker":
        notes.append("folds NOT speaker-independent (every labelled clip names one speaker)")
    elif metrics["labelled_without_group"]:
        notes.append(f"folds speaker-independent only for the clips that name a group "
                     f"({metrics['labelled_without_group']} labelled clips name none)")
    elif not metrics["speaker_independent"]:
        notes.append("folds NOT speaker-independent (no group column)")
    if metrics["speaker_norm"]:
        notes.append("stores standardised per speaker" + (" (speakers found by voice)"
                                                          if metrics["speaker_groups"] == "voice clusters" else ""))
    if metrics["refined_labels"] or metrics["pseudo_labels"]:
        what = " and ".join(w for w, on in (("refined labels", metrics["refined_labels"]),
                                            ("pseudo-labels", metrics["pseudo_labels"])) if on)
        notes.append(f"trained on {what} made in each training fold" if metrics["refined_in_folds"]
                     else f"trained on {what}: optimistic (refine saw every fold)")
        if changes := metrics["label_changes_per_fold"]:
            mean = {k: sum(c[k] for c in changes) / len(changes) for k in changes[0]}
            notes.append("per fold on average {left_out:.0f} of {total:.0f} labelled training clips left out, "
                         "{relabelled:.0f} relabelled, {softened:.0f} softened, {pseudo_labelled:.0f} "
                         "pseudo-labelled".format(total=mean["training_clips"] + mean["left_out"], **mean))
    if screened := sorted({s for kept in metrics["kept_stores_per_fold"] for s in metrics["stores"] if s not in kept}):
        folds = metrics["kept_stores_per_fold"]
        notes.append("screened out (carried nothing on the training fold): " + ", ".join(
            f"{s} in {sum(s not in kept for kept in folds)} of {len(folds)} folds" for s in screened))
    if own := metrics["self_trained_per_fold"]:  # None: the fold was too small to self-train
        done = [n for n in own if n is not None]
        notes.append(f"self-training in {len(done)} of {len(own)} folds, {sum(done) / len(done):.0f} pseudo-labelled "
                     f"clips per fold (train.self_training_threshold {cfg.self_training_threshold})" if done else
                     "self-training in no fold (fewer labelled training clips than train.self_training_min_clips)")
    notes.append(f"{cands['total']} candidates predicted, {cands['prior_no_modality']} of them by the prior "
                 "(no usable modality)")
    print(f"weighted F1 {metrics['weighted_f1']:.4f} (folds {metrics['folds']['weighted_f1_mean']:.4f} "
          f"± {metrics['folds']['weighted_f1_std']:.4f}); {'; '.join(notes)} -> {args.reports / 'metrics.json'}")

if __name__ == "__main__":
    main()
