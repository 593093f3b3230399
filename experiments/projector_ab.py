"""Seconds per fold, same process, rounds interleaved: the input projection store by store (each
store's Linear, GELU and dropout: before) or each store's Linear, then one GELU and one dropout
over every token (`_Projector.forward` now).

    python experiments/projector_ab.py [ROUNDS]

Five synthetic stores with the video stores' widths (pipeline.bench.train_speed), 3,000 clips,
params.yaml's train section, full 5-fold CV. Prints each row's seconds per fold per round,
whether the two give the same probabilities (they must, to the bit: the dropout draws the same
bits), and each row's best and mean round as a ratio of before's. Run from the repository root.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import torch

from pipeline.bench.train_speed import STORE_SETS, synthetic
from pipeline.config import load_params
from pipeline.fusion import models
from pipeline.fusion import train as trainer


def store_by_store(self: models._Projector, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The projection as it was: the whole Sequential per store, the LayerNorm skipped when applied once."""
    skip = 1 if self.inputs_normalized else 0
    outputs = []
    for name in self.names:
        x = inputs[name]
        for layer in list(self.proj[name])[skip:]:
            x = layer(x)
        outputs.append(x)
    return torch.stack(outputs, dim=1)


def main(rounds: int) -> None:
    dims = STORE_SETS["video"]
    clips, features = synthetic(dims, 3000)
    cfg = replace(load_params("params.yaml").train, stores=list(dims))
    rows = {"store by store (before)": store_by_store, "one GELU and dropout (now)": models._Projector.forward}
    seconds, probs = {k: [] for k in rows}, {}
    now = models._Projector.forward
    try:
        for _ in range(rounds):
            for name, forward in rows.items():
                models._Projector.forward = forward
                result = trainer.cross_validate(clips, features, cfg, quiet=True, fold_lines=False)
                seconds[name].append(float(np.mean(result.seconds_per_fold)))
                probs[name] = result.oof_probs
                print(f"{name}: {seconds[name][-1]:.2f} s/fold", flush=True)
    finally:
        models._Projector.forward = now
    before, after = list(rows)
    print("the two give the same probabilities:", np.array_equal(probs[before], probs[after]))
    for name, values in seconds.items():
        print(f"{name}: best {min(values):.2f} s/fold (x{min(values) / min(seconds[before]):.3f}), "
              f"mean {np.mean(values):.2f} (x{np.mean(values) / np.mean(seconds[before]):.3f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
