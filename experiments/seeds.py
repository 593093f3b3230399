"""CV and held-out weighted F1 of train-param variants, as means over fold seeds, on a bench-heldout project.

    python experiments/seeds.py build/heldout/ravdess 0,1,2,3,4 '{}' '{"mixup": 1.0}' '{"model": {"width": 128}}'
    python experiments/seeds.py --extra speaker build/heldout/ravdess 0,1,2 '{"stores": ["prosody", "whisper", "text", "speaker"]}'

Each variant is a JSON object of `train:` fields (`model` holds `train.model:` fields), applied
over the project's own params; `{}` is the project's params as they are. `stores` picks among
the project's stores and those `--extra` loads beside them (any `features/<name>.h5` of the
project, e.g. the `speaker` voice store or one `rich_prosody.py` wrote). Per variant, one line:
the means, then each seed's CV / held out. Trains with `cross_validate` on the project's stores,
as `dvc repro train` does (`{}` at the project's own train.seed gives its `predictions.csv`). The candidates'
labels score the variants, never choose among them: the README's choices are made on the CV column.
A project without a truth.csv (`.`, this repository's demo after `make repro`) prints CV only:

    python experiments/seeds.py . 0,1,2,3,4,5,6,7,8,9 '{}' '{"self_training_min_clips": 0}'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from _project import cv_score, heldout_score, load_project
from pipeline.fusion.features import select
from pipeline.fusion.train import cross_validate


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", type=Path, help="a bench-heldout folder (build/heldout/ravdess) or a project (.)")
    parser.add_argument("seeds", help="fold seeds, comma-separated")
    parser.add_argument("variants", nargs="+", metavar="JSON")
    parser.add_argument("--extra", default="", help="stores to load beside the project's train.stores, comma-separated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    project = load_project(args.project, extra=[s for s in args.extra.split(",") if s])
    default = [s for s in project.features.stores if s not in project.extra]  # train.stores that carry features
    for variant in args.variants:
        changes = json.loads(variant)
        model_changes = changes.pop("model", {})
        chosen = changes.pop("stores", default)
        features = select(project.features, chosen)
        cvs, held, seconds = [], [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = replace(project.cfg, **changes, stores=chosen, seed=seed,
                          model=replace(project.cfg.model, **model_changes))
            result = cross_validate(project.clips, features, cfg, quiet=True, fold_lines=False)
            cvs.append(cv_score(result, project.clips))
            held.append(heldout_score(result, project.clips, project.truth))
            seconds.append(float(np.mean(result.seconds_per_fold)))
        if project.truth:
            means, per_seed = f"CV {np.mean(cvs):.4f} held out {np.mean(held):.4f}", [f"{c:.3f}/{h:.3f}" for c, h in zip(cvs, held)]
        else:  # no candidates' labels: CV only
            means, per_seed = f"CV {np.mean(cvs):.4f}", [f"{c:.3f}" for c in cvs]
        print(f"{args.project.resolve().name} {variant}: {means} s/fold {np.mean(seconds):.1f} | {' '.join(per_seed)}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
