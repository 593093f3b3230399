"""Candidates from the fold models' average, or from one model set refit on every labelled clip?

    python experiments/nested.py build/heldout/ravdess 0,1,2

No CV figure scores the candidates' models, so this nests one CV in another. Each outer fold
(the trainer's own group folds) hides its clips' labels; the rest is a labelled set of its own,
and its hidden clips are candidates, answered two ways: (a) the fold average of an inner
5-fold CV, which is what `dvc repro train` gives candidates (`cross_validate` on the outer
training part: five model sets on 64 % each); (b) one model set trained on the whole outer
training part (80 %), as a refit would be. Both use the project's train params (self-training
included: its pool is the hidden clips and the project's candidates), on stores read again per
outer fold so that nothing, the voice clustering's guard included, reads a hidden label. Prints, per variant, the
outer folds' weighted F1 for (a), (b) and their average, per seed and as the mean.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from _project import load_project
from pipeline.data.splits import training_folds
from pipeline.fusion import train as trainer
from pipeline.fusion.member import weighted_f1
from pipeline.labels import EMOTIONS


@contextlib.contextmanager
def one_model_set() -> Iterator[None]:
    """cross_validate with a single 'fold' that trains on every labelled clip and scores none."""
    saved = trainer.training_folds, trainer._average, trainer.weighted_f1
    average, f1 = saved[1], saved[2]
    trainer.training_folds = lambda labels, *_args, **_kw: [(np.arange(len(labels)), np.zeros(0, int))]
    trainer._average = lambda members, features, rows, cfg: (  # no scored clips: nothing to answer
        average(members, features, rows, cfg) if len(rows) else
        (np.zeros((0, len(EMOTIONS)), np.float32), np.zeros((0, len(features.stores)), np.float32)))
    trainer.weighted_f1 = lambda gold, pred: f1(gold, pred) if len(gold) else float("nan")
    try:
        yield
    finally:
        trainer.training_folds, trainer._average, trainer.weighted_f1 = saved


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    logging.basicConfig(level=logging.ERROR)
    project = load_project(Path(argv[0]))
    clips, cfg = project.clips, project.cfg
    usable = project.features.mask.any(axis=1)  # as cross_validate: a labelled clip without features is left out
    labelled = [i for i, c in enumerate(clips) if c.label and usable[i]]
    labels = [clips[i].label for i in labelled]
    groups = [clips[i].group for i in labelled]
    voices = [project.features.fold_groups[i] for i in labelled] if project.features.fold_groups is not None else []
    if not any(groups) and len({v for v in voices if v}) >= cfg.folds:  # as cross_validate folds unnamed clips
        groups = voices
    gold = np.array([EMOTIONS.index(x) for x in labels])
    scores = {"fold average (a)": [], "one set on all (b)": [], "both averaged": []}
    for seed in (int(s) for s in argv[1].split(",")):
        probs = {"a": np.zeros((len(labelled), len(EMOTIONS))), "b": np.zeros((len(labelled), len(EMOTIONS)))}
        for _train, hidden in training_folds(labels, groups, cfg.folds, seed, "outer folds", warn=False):
            names = {clips[labelled[j]].name for j in hidden}
            part = [replace(c, label=None, valence=None, split="unlabelled", candidate=True) if c.name in names else c
                    for c in clips]
            features = project.features_for(part)  # the voice clustering's guard must not read the hidden labels
            runs = {"a": trainer.cross_validate(part, features, replace(cfg, seed=seed), quiet=True, fold_lines=False)}
            with one_model_set():
                runs["b"] = trainer.cross_validate(part, features, replace(cfg, seed=seed), quiet=True,
                                                   fold_lines=False)
            position = {clips[labelled[j]].name: j for j in hidden}
            for key, result in runs.items():
                for i, p in zip(result.unlabelled, result.unlabelled_probs):
                    if part[i].name in position:
                        probs[key][position[part[i].name]] = p
        row = [weighted_f1(gold, probs["a"].argmax(1)), weighted_f1(gold, probs["b"].argmax(1)),
               weighted_f1(gold, (probs["a"] + probs["b"]).argmax(1))]
        for name, value in zip(scores, row):
            scores[name].append(value)
        print(f"seed {seed}: " + ", ".join(f"{n} {v:.4f}" for n, v in zip(scores, row)), flush=True)
    print(f"{Path(argv[0]).name}, mean of {len(scores['both averaged'])} seeds: "
          + ", ".join(f"{n} {np.mean(v):.4f}" for n, v in scores.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
