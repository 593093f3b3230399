"""Seconds per fold, same process, rounds interleaved: each member's batch gathered with `v[idx]`
(before) or `torch.index_select` (now), and mixup off or on.

    python experiments/gather_ab.py [ROUNDS]

Five synthetic stores with the video stores' widths (pipeline.bench.train_speed), 3,000 clips,
params.yaml's train section. Prints each row's seconds per fold per round, whether the two
gathers give the same probabilities (they must, to the bit), and each row's best round as a
ratio of the `v[idx]` row's. Run from the repository root.
"""

from __future__ import annotations

import sys
import types
from dataclasses import replace

import numpy as np
import torch

from pipeline.bench.train_speed import STORE_SETS, synthetic
from pipeline.config import load_params
from pipeline.fusion import member
from pipeline.fusion import train as trainer


def main(rounds: int) -> None:
    dims = STORE_SETS["video"]
    clips, features = synthetic(dims, 3000)
    base = replace(load_params("params.yaml").train, stores=list(dims))
    before = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    before.index_select = lambda values, _dim, index: values[index]  # what member.py called before
    rows = {"v[idx], mixup 0 (before)": (before, 0.0), "index_select, mixup 0": (torch, 0.0),
            "index_select, mixup 1.0": (torch, 1.0)}
    seconds, probs = {k: [] for k in rows}, {}
    try:
        for _ in range(rounds):
            for name, (module, mixup) in rows.items():
                member.torch = module
                result = trainer.cross_validate(clips, features, replace(base, mixup=mixup), quiet=True,
                                                fold_lines=False)
                seconds[name].append(float(np.mean(result.seconds_per_fold)))
                probs[name] = result.oof_probs
                print(f"{name}: {seconds[name][-1]:.2f} s/fold", flush=True)
    finally:
        member.torch = torch
    names = list(rows)
    print("the two gathers give the same probabilities:", np.array_equal(probs[names[0]], probs[names[1]]))
    for name, values in seconds.items():
        print(f"{name}: best {min(values):.2f} s/fold, x{min(values) / min(seconds[names[0]]):.3f} of before")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
