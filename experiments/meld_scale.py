"""Self-training at MER2025's candidate ratio, on real text.

    python experiments/meld_scale.py build/meld_scale 0,1,2 'off={"self_training": false}' \
        'default={}' 'no_cap={"self_training_max_ratio": 0}' 'cap_half={"self_training_max_ratio": 0.5}'

MELD (from ../shared/data, or --shared DIR): bench-heldout's 3,003 labelled training utterances
(a seeded sample of whole dialogues) against every other MELD train and dev utterance as
candidates, 7,802 of them, 2.6 per labelled clip (MER2025 hands out about 20,000 candidates
for 7,369 labelled clips). The first run builds the dataset and a project in the work folder
and extracts the text store with `dvc repro` (about 5 min on 2 cores); later runs reuse it.
Each variant (name=JSON of `train:` fields over the project's params) prints one JSON line per
fold seed: CV, held out on the 7,802 candidates, pseudo-labels per fold, seconds per fold.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from _project import cv_score, heldout_score, load_project
from pipeline.bench import heldout
from pipeline.data import convert
from pipeline.fusion.train import cross_validate


def build(work: Path, shared: Path) -> None:
    root, truth, project = work / "dataset", work / "truth.csv", work / "project"
    if not root.exists():
        items, _ = convert.meld(shared / "meld")
        labelled, _ = heldout.split_items("meld", items, 3000)
        kept = {i.name for i in labelled}
        work.mkdir(parents=True, exist_ok=True)
        heldout.write_heldout(labelled, [i for i in items if i.name not in kept], root, truth)
    if not (project / "features" / "text.h5").exists():
        heldout.make_project(project, root, {})
        start = time.perf_counter()
        subprocess.run(["dvc", "repro", "extract@text"], cwd=project, env=heldout._env(), check=True)
        print(f"text store extracted in {time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("seeds", help="fold seeds, comma-separated")
    parser.add_argument("variants", nargs="+", metavar="NAME=JSON")
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    build(args.work.resolve(), args.shared)
    project = load_project(args.work.resolve(), stores=["text"], speaker_stores=[])  # text only: no voices
    print(f"{len(project.clips)} clips, {sum(c.label is not None for c in project.clips)} labelled, "
          f"{len(project.truth)} candidates", flush=True)
    for spec in args.variants:
        name, _, changes = spec.partition("=")
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            result = cross_validate(project.clips, project.features,
                                    replace(project.cfg, seed=seed, **json.loads(changes or "{}")),
                                    quiet=True, fold_lines=False)
            print(json.dumps({"variant": name, "seed": seed, "cv": round(cv_score(result, project.clips), 4),
                              "heldout": heldout_score(result, project.clips, project.truth),
                              "pseudo_labels_per_fold": result.self_trained,
                              "s_per_fold": round(float(np.mean(result.seconds_per_fold)), 1),
                              "total_s": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
