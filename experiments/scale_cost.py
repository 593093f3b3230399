"""Self-training's cost at MER2025's candidate ratio, near the worst case: synthetic clips the
teacher is mostly sure of (the printed pseudo-label counts say how many were).

    python experiments/scale_cost.py 9000 off,cap1,nocap

3,000 labelled synthetic clips with the five video stores' widths (pipeline.bench.train_speed)
plus N unlabelled candidates, params.yaml's train section, in one process: self-training off,
capped at one pseudo-label per labelled training clip (`self_training_max_ratio: 1.0`, the
default) and uncapped (0). Prints seconds per fold, each fold's, and the pseudo-labels per fold.
Run from the repository root.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np

from pipeline.bench.train_speed import STORE_SETS, synthetic
from pipeline.config import load_params
from pipeline.fusion.train import cross_validate
from pipeline.manifest import Clip

VARIANTS = {"off": {"self_training": False}, "cap1": {}, "nocap": {"self_training_max_ratio": 0.0}}


def main(candidates: int, wanted: list[str]) -> None:
    dims = STORE_SETS["video"]
    clips, features = synthetic(dims, 3000 + candidates)
    clips = [c if i < 3000 else Clip(name=c.name, label=None, group=c.group) for i, c in enumerate(clips)]
    base = replace(load_params("params.yaml").train, stores=list(dims))
    for name in wanted:
        result = cross_validate(clips, features, replace(base, **VARIANTS[name]), quiet=True, fold_lines=False)
        print(name, "s/fold", round(float(np.mean(result.seconds_per_fold)), 1),
              "folds", [round(s, 1) for s in result.seconds_per_fold], "pseudo-labels", result.self_trained, flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(int(sys.argv[1]), sys.argv[2].split(",") if len(sys.argv) > 2 else ["off", "cap1"])
