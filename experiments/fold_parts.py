"""Where a fold's seconds go: store screening, the linear member (and self-training's teacher),
the fusion members side by side, and the answers' average.

    python experiments/fold_parts.py [video | "subtitles + LLM"]

Five synthetic stores with the video stores' widths (or the two text stores'), 3,000 clips,
params.yaml's train section, full 5-fold CV. Prints seconds per fold and each part's share of
it. The host's load moves these by 10-30 % from hour to hour: compare parts within one run.
Run from the repository root.
"""

from __future__ import annotations

import collections
import sys
import time
from dataclasses import replace

from pipeline.bench.train_speed import STORE_SETS, synthetic
from pipeline.config import load_params
from pipeline.fusion import train as trainer


def main(which: str) -> None:
    dims = STORE_SETS[which]
    clips, features = synthetic(dims, 3000)
    cfg = replace(load_params("params.yaml").train, stores=list(dims))
    spent = collections.Counter()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    trainer.screen.screen_fold = timed("screening", trainer.screen.screen_fold)
    trainer.fit_linear = timed("linear member", trainer.fit_linear)
    trainer._side_by_side = timed("fusion members", trainer._side_by_side)
    trainer._average = timed("average", trainer._average)
    result = trainer.cross_validate(clips, features, cfg, quiet=True, fold_lines=False)
    folds = len(result.seconds_per_fold)
    print(f"{which}: {sum(result.seconds_per_fold) / folds:.2f} s/fold; "
          + ", ".join(f"{name} {value / folds:.2f} s" for name, value in spent.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "video")
