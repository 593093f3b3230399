"""The fusion trainer: stratified (group-aware) k-fold cross-validation on cached features.

Honest scores. Each outer fold is scored by a model that never saw it and was not chosen
on it. With `epoch_choice: fixed` (the default) every model trains `train.epochs` epochs on
its whole training fold (the outer fold is scored per epoch only for the curves). With
`inner_split` the epoch is chosen on an inner split of the training fold (stratified,
group-aware, about 1/folds), then (`refit`) retrained that long on the whole fold; one
inner split of a few speakers is a noisy judge (README "Fusion": measured). The reported
weighted F1 is the outer folds' out-of-fold one. Without a `group` (speaker) column the
folds are not speaker-independent: the log and `metrics.json` say so.

What enters training. A store no clip has is left out, with one warning; one that
predicts nothing on a training fold is masked there (`train.screen_stores`, screen.py). A
labelled clip with no usable modality never enters a fold (named, counted in
`excluded_no_modality`); an unlabelled one gets the training prior, flagged. Refined labels
and pseudo-labels train only: validation is always scored against the gold labels. With
`train.self_training` each fold's fusion members train on its teacher's confident answers
for the clips the fold predicts, never on their labels, so the CV figure stays honest for a
setting where the clips to predict are at hand (MER's candidates); the default teacher is the
fold's linear member, fitted first on the labelled rows. A non-finite loss stops training
with one line naming the fold and epoch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.errors import TrainError
from pipeline.fusion.checkpoint import fold_checkpoint
from pipeline.fusion.linear import fit_linear
from pipeline.fusion import screen
from pipeline.fusion.member import predict, train_device, train_fold, weighted_f1  # noqa: F401 - re-exported
from pipeline.fusion.targets import confident_targets, describe, target_changes, training_targets, trains
from pipeline.labels import EMOTIONS, EMOTION_INDEX
from pipeline.data.splits import fold_groups, inner_split, training_folds, warn_small_classes
from pipeline.fusion.features import Features, Standardizer, load_features, select  # noqa: F401 - re-exported
from pipeline.manifest import Clip

log = logging.getLogger(__name__)
# names of the clips an outer fold scores -> (refined, pseudo) targets made without their labels
FoldRefiner = Callable[[set[str]], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


@dataclass
class CVResult:
    oof_probs: np.ndarray  # (n_labelled, 6), out of fold
    labelled: list[int]  # rows of the labelled clips that were cross-validated
    unlabelled_probs: np.ndarray  # (n_unlabelled, 6), fold average (the prior where `no_modality`)
    unlabelled: list[int]
    weights: np.ndarray  # (N, M) modality weights, oof for labelled, fold average otherwise
    fold_scores: list[float]  # weighted F1 of each outer fold's out-of-fold predictions
    histories: list[list[dict]]  # per fold (its first member), per epoch: train loss and the watched weighted F1
                                 # (the scored fold with epoch_choice fixed, the inner split with inner_split)
    checkpoints: list[dict]
    seconds_per_fold: list[float]
    excluded: list[int] = field(default_factory=list)  # labelled rows with no usable modality: never trained on
    no_modality: np.ndarray | None = None  # (N,) bool: the clip has no usable modality (its prediction is the prior)
    prior: np.ndarray | None = None  # (6,) class frequencies of the cross-validated labelled clips
    speaker_independent: bool = False  # folds split by the manifest's `group`, every scored clip naming one
    labelled_without_group: int = 0  # scored clips naming no group while others do (split clip by clip)
    selected_epochs: list[int] = field(default_factory=list)
    stores: list[str] = field(default_factory=list)  # the stores the models read
    dropped: list[str] = field(default_factory=list)  # stores named in params that carried nothing
    refined_labels: bool = False  # trained on refined labels (train.use_refined)
    refined_in_folds: bool = False  # refined / pseudo labels made inside each training fold (honest CV)
    pseudo_labels: bool = False  # pseudo-labelled clips trained (train.use_pseudo)
    present: np.ndarray | None = None  # (N, M) bool, columns in `stores` order: the clip has that modality
    model_kind: str = ""  # the fusion kind trained: train.model.kind, or `single` when one store carries features
    speaker_normalized: bool = False  # the stores were standardised per speaker (train.speaker_norm)
    speaker_groups: str = ""  # by what: "named" (the dataset's groups) | "voice clusters"
    folds_grouped_by: str = ""  # "named" (the manifest's groups) | "voice clusters" | "one speaker" | "" (by clip)
    label_changes: list[dict] = field(default_factory=list)  # per fold, with refined / pseudo labels: targets.target_changes
    kept_stores: list[list[str]] = field(default_factory=list)  # per fold: the stores its models read (screen.py)
    self_trained: list[int | None] = field(default_factory=list)  # per fold: teacher's pseudo-labels trained; None: skipped


def cross_validate(clips: list[Clip], features: Features, cfg: TrainConfig,
                   refined: dict[str, np.ndarray] | None = None,
                   pseudo: dict[str, np.ndarray] | None = None, quiet: bool = False,
                   fold_lines: bool = True, fold_refiner: FoldRefiner | None = None) -> CVResult:
    """k-fold CV. `refined`: name -> soft target for labelled clips; `pseudo`: name -> soft
    target for unlabelled clips. Both only ever enter training rows. `fold_refiner` (with
    `train.refine_in_folds`): called per outer fold with the names of the clips it scores, it
    returns that fold's (refined, pseudo), made without those clips' labels; it replaces
    `refined` and `pseudo`. `quiet`: the dataset warnings at debug level (the ablation says
    them once, for its first row); `fold_lines` false: the per-fold lines too (the ablation
    prints one line per variant)."""
    warn = log.debug if quiet else log.warning
    say = log.info if fold_lines and not quiet else log.debug
    side_by_side = min(cfg.threads, cfg.ensemble)  # members trained at once, one CPU thread each
    # one thread per model: the model is too small to split (ensemble 1 on 2 threads: 5.4 s per fold
    # against 4.6 on one, two text stores, 3,000 clips)
    torch.set_num_threads(1)
    if cfg.model.kind != "single" and len(features.stores) == 1:
        # one modality token: nothing to attend across or weigh, and on MELD text (group 5-fold,
        # fold seeds 0-3) ECMF's extra layer over it scored 0.548 against 0.557 for the plain
        # head; so the model is `single` on that store, said here and in metrics.json `model_kind`
        warn("train: only store %s carries features, so there is nothing to fuse: train.model.kind %s "
             "trains as `single` on it (the concat head)", features.stores[0], cfg.model.kind)
        cfg = config_with(cfg, kind="single", single=features.stores[0])  # features stay as they are
    elif cfg.model.kind == "single":
        features = select(features, [cfg.model.single])
    usable = features.mask.any(axis=1)
    excluded = [i for i, c in enumerate(clips) if c.label and not usable[i]]
    if excluded:
        shown = ", ".join(clips[i].name for i in excluded[:10]) + (" ..." if len(excluded) > 10 else "")
        warn("%d labelled clip(s) have no usable modality in %s and are left out of training and scoring: %s",
             len(excluded), ", ".join(features.stores), shown)
    labelled = [i for i, c in enumerate(clips) if c.label and usable[i]]
    unlabelled = [i for i, c in enumerate(clips) if not c.label]
    if len(labelled) < 2:
        raise TrainError(f"{len(labelled)} labelled clip(s) have a usable modality in "
                         f"{', '.join(features.stores)}; training needs clips with features and labels")
    labels = [clips[i].label for i in labelled]
    groups = [clips[i].group for i in labelled]
    unnamed = [clips[i].name for i, g in zip(labelled, groups) if g is None]
    speaker_independent = not unnamed  # every scored clip's speaker is kept to one side of each split
    folds_by = "named" if len(unnamed) < len(groups) else ""
    if folds_by and (n_folds := fold_groups(groups, cfg.folds)) == 1:
        warn("train: every labelled clip names one speaker (group %r): no fold can hold a speaker out, so clips are "
             "split and the CV score is optimistic for unseen speakers; label clips of a second speaker", groups[0])
        speaker_independent, folds_by = False, "one speaker"
    elif folds_by and n_folds < cfg.folds:
        warn("train: the labelled clips name %d speakers (groups), fewer than params key 'train.folds' (%d): "
             "each of %d folds holds one speaker out", n_folds, cfg.folds, n_folds)
    voices = [features.fold_groups[i] for i in labelled] if features.fold_groups is not None else []
    n_voices = len({g for g in voices if g})
    if not folds_by and n_voices >= cfg.folds:
        # no clip names its speaker: fold by pseudo-speaker (the finest voice clustering) instead, so a
        # fold's voices are mostly new to its model (RAVDESS, unnamed: CV 0.79-0.82 this way, 0.80 by
        # the true actors, 0.93 by clip; README "Fusion")
        groups, folds_by = voices, "voice clusters"
        if not quiet:
            log.info("the manifest has no `group` (speaker): folds are grouped by voice clusters "
                     "(%d pseudo-speakers), an estimate of unseen-speaker folds", n_voices)
    elif not folds_by:
        warn("the manifest has no `group` (speaker): folds are not speaker-independent, so the CV score "
             "is optimistic for unseen speakers; add a group column to the label file")
    elif unnamed:  # each such clip is a fold group of its own: its speaker's other clips may sit across the split
        warn("%d of %d labelled clips name no group (speaker), e.g. %s: each is split on its own, so the folds are "
             "speaker-independent only for the others and the CV score may be optimistic; name every labelled "
             "clip's group", len(unnamed), len(groups), unnamed[0])
    warn_small_classes(labels, cfg.folds, warn)
    gold = np.array([EMOTION_INDEX[x] for x in labels])
    prior = np.bincount(gold, minlength=len(EMOTIONS)).astype(np.float32) / len(gold)
    nested = fold_refiner is not None and cfg.refine_in_folds and (cfg.use_refined or cfg.use_pseudo)
    targets, pseudo_rows, pseudo_targets = training_targets(clips, labelled, unlabelled, usable, cfg, refined, pseudo)
    if ((cfg.use_refined and refined) or (cfg.use_pseudo and pseudo)) and not nested:
        warn("train.use_refined / use_pseudo: the refine stage made these labels from every labelled clip, "
             "the scored folds' too, so this CV score is optimistic; train.refine_in_folds: true refines "
             "inside each training fold instead")
    folds = training_folds(labels, groups, cfg.folds, cfg.seed, f"train: {len(labels)} labelled clips")
    oof = np.zeros((len(labelled), len(EMOTIONS)), np.float32)
    weights = np.zeros((len(clips), len(features.stores)), np.float32)
    unl_probs = np.zeros((len(unlabelled), len(EMOTIONS)), np.float32)
    unl_usable = usable[unlabelled] if unlabelled else np.zeros(0, bool)
    unl_probs[~unl_usable] = prior
    result = CVResult(oof, labelled, unl_probs, unlabelled, weights, [], [], [], [], excluded, ~usable, prior,
                      speaker_independent, stores=list(features.stores), dropped=list(features.dropped),
                      refined_labels=bool(cfg.use_refined and (refined or nested)),
                      refined_in_folds=nested, pseudo_labels=bool(cfg.use_pseudo and (pseudo or nested)),
                      present=features.mask.copy(), model_kind=cfg.model.kind,
                      speaker_normalized=features.speaker_normalized, speaker_groups=features.speaker_groups,
                      folds_grouped_by=folds_by, labelled_without_group=len(unnamed) if folds_by == "named" else 0)
    lab_rows = np.array(labelled)
    pred_rows = np.array(unlabelled, dtype=int)[unl_usable]
    for k, (tr, va) in enumerate(folds):
        if nested:  # this fold's labels and pseudo-labels, refined without the labels it scores
            fold_refined, fold_pseudo = fold_refiner({clips[lab_rows[j]].name for j in va})
            targets, pseudo_rows, pseudo_targets = training_targets(clips, labelled, unlabelled, usable, cfg,
                                                                    fold_refined, fold_pseudo)
        if result.refined_labels or result.pseudo_labels:
            result.label_changes.append(target_changes(gold[tr], targets[tr], len(pseudo_rows)))
            say("fold %d trains on %s", k, describe(result.label_changes[-1]))
        start = time.perf_counter()  # training only: a refinement is shared by the ablation's variants

        own_rows, own_targets, teacher = np.zeros(0, int), np.zeros((0, len(EMOTIONS)), np.float32), None  # self-training

        def rows_and_targets(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # labelled part + pseudo rows
            part = part[trains(targets[part])]  # refine.mode drop's clips never train
            rows = np.concatenate([lab_rows[part], np.array(pseudo_rows, dtype=int), own_rows])
            return rows, np.concatenate([targets[part], *([] if pseudo_targets is None else [pseudo_targets]), own_targets])

        if cfg.epoch_choice == "inner_split":  # one inner split per fold, shared by its members
            inner_tr, inner_va = inner_split([labels[j] for j in tr], [groups[j] for j in tr], cfg.folds, cfg.seed + k, k)
            pick = tr[inner_va]

        part = tr[trains(targets[tr])]  # train.screen_stores: stores that carry nothing here are masked (screen.py)
        kept = screen.screen_fold(features, lab_rows[part], targets[part].argmax(1), [groups[j] for j in part], cfg, k, say)
        result.kept_stores.append(kept)
        seen = screen.apply(features, kept)

        def train_member(member: int) -> dict:  # same data, own seed: the average is steadier than any one
            seed = cfg.seed + k + 1000 * member
            if cfg.epoch_choice == "fixed":  # the scored fold is watched for the curves, never chosen on
                watched = va if member == 0 else va[:0]  # the curves are the first member's (`histories`)
                return train_fold(seen, *rows_and_targets(tr), lab_rows[watched], gold[watched], cfg, seed, k, choose=False)
            fold = train_fold(seen, *rows_and_targets(tr[inner_tr]), lab_rows[pick], gold[pick], cfg, seed, k)
            if cfg.refit:  # the chosen epoch count, retrained on the whole training fold (nothing is chosen on it)
                chosen = fold
                fold = train_fold(seen, *rows_and_targets(tr), np.zeros(0, int), np.zeros(0, int),
                                  replace(cfg, epochs=chosen["epoch"] + 1), seed, k)
                fold.update(history=chosen["history"], epoch=chosen["epoch"], val_f1=chosen["val_f1"])
            return fold

        def fit_members() -> list[dict]:  # the fusion members side by side, then the linear member (linear.py)
            members = _side_by_side(train_member, cfg.ensemble, side_by_side)
            if cfg.linear_weight > 0:  # standardised as the members were when on the same rows; the linear teacher is it
                norm = members[0]["norm"] if cfg.epoch_choice == "fixed" or cfg.refit else None
                members.append(teacher or fit_linear(seen, *rows_and_targets(tr), cfg.linear_c, cfg.seed + k, norm))
            return members

        if cfg.self_training and len(part) < cfg.self_training_min_clips:  # measured to hurt there (README)
            result.self_trained.append(None)
            say("fold %d: no self-training: %d labelled training clips, under train.self_training_min_clips (%d)",
                k, len(part), cfg.self_training_min_clips)
        elif cfg.self_training:  # a teacher answers the clips this fold predicts (its scored clips, labels
            # unread, and the candidates); its confident answers join the fusion members' training rows (targets.py)
            pool = np.concatenate([lab_rows[va], pred_rows])
            if cfg.self_training_teacher == "linear":  # the fold's linear member, fitted first on the labelled rows only
                teacher = fit_linear(seen, *rows_and_targets(tr), cfg.linear_c, cfg.seed + k)
                answers = predict(teacher["model"], teacher["norm"](seen, pool), torch.from_numpy(seen.mask[pool]))[0]
            else:
                answers = _average(fit_members(), seen, pool, cfg)[0]
            cap = int(cfg.self_training_max_ratio * len(part)) if cfg.self_training_max_ratio else None
            own_rows, own_targets, sure = confident_targets(answers, pool, cfg.self_training_threshold, cap)
            result.self_trained.append(len(own_rows))
            say("fold %d: self-training on %d of its %d scored and unlabelled clips%s", k, len(own_rows), len(pool),
                f" ({sure} confident, each class cut to its surest share: train.self_training_max_ratio "
                f"{cfg.self_training_max_ratio:g} x {len(part)} labelled)" if sure > len(own_rows) else "")
        members = fit_members()
        result.checkpoints += [fold_checkpoint(m, cfg, features, k, prior, "linear" if m.get("linear") else i,
                                               _blend_weight(m, cfg), kept) for i, m in enumerate(members)]
        oof[va], weights[lab_rows[va]] = _average(members, seen, lab_rows[va], cfg)
        if len(pred_rows):
            probs, w = _average(members, seen, pred_rows, cfg)
            unl_probs[unl_usable] += probs / len(folds)
            weights[pred_rows] += w / len(folds)
        result.fold_scores.append(weighted_f1(gold[va], oof[va].argmax(1)))
        result.histories.append(members[0]["history"])
        result.selected_epochs.append([m["epoch"] for m in members[:cfg.ensemble]] if cfg.ensemble > 1 else members[0]["epoch"])
        result.seconds_per_fold.append(time.perf_counter() - start)
        if cfg.epoch_choice == "fixed":
            say("fold %d: %d epochs (train.epochs, fixed), outer fold weighted F1 %.4f (%.1fs)",
                k, cfg.epochs, result.fold_scores[-1], result.seconds_per_fold[-1])
        else:
            say("fold %d: epoch %s chosen on the inner split (weighted F1 %s), outer fold weighted F1 %.4f (%.1fs)",
                k, "/".join(str(m["epoch"]) for m in members), "/".join(f"{m['val_f1']:.4f}" for m in members),
                result.fold_scores[-1], result.seconds_per_fold[-1])
    for name, values in (("out-of-fold probabilities", oof), ("candidate probabilities", unl_probs),
                         ("modality weights", weights)):
        if not np.isfinite(values).all():
            raise TrainError(f"training gave non-finite {name}; this is a bug: please report it with the params")
    return result


def _side_by_side(train_member: Callable[[int], dict], count: int, workers: int) -> list[dict]:
    """`train_member(0..count-1)` on `workers` threads, in member order: torch releases the GIL in its
    ops (0.55-0.7 of the time, README "Fusion"); own seeds and dropout streams, so `workers` changes nothing."""
    if workers <= 1:  # workers = min(train.threads, count)
        return [train_member(i) for i in range(count)]
    with ThreadPoolExecutor(workers, thread_name_prefix="fusion-member") as pool:
        return list(pool.map(train_member, range(count)))


def _blend_weight(member: dict, cfg: TrainConfig) -> float:
    """A member's share of its fold's answer: train.linear_weight for the linear member, the rest
    split evenly between the fusion members."""
    if member.get("linear"):
        return cfg.linear_weight
    return (1.0 - cfg.linear_weight) / cfg.ensemble


def _average(members: list[dict], features: Features, rows: np.ndarray,
             cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """An outer fold's class probabilities on `rows`: its members' blend (_blend_weight); the
    modality weights are the fusion members' mean (the linear member has no gate to report)."""
    outs = [predict(m["model"], m["norm"](features, rows), torch.from_numpy(features.mask[rows])) for m in members]
    probs = sum(_blend_weight(m, cfg) * p for m, (p, _) in zip(members, outs))
    return probs, np.mean([w for m, (_, w) in zip(members, outs) if not m.get("linear")], axis=0)


def config_with(cfg: TrainConfig, **model_changes) -> TrainConfig:
    """A copy of `cfg` with some model settings changed (for ablations)."""
    return replace(cfg, model=replace(cfg.model, **model_changes))
