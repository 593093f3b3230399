"""Other speakers as the candidates: a bench-heldout project rotated, its stores shared, so that
every speaker of a corpus is predicted blind once.

    python experiments/rotate.py build/heldout/ravdess build/rotated/ravdess_01-04 actor_01,actor_02,actor_03,actor_04
    python experiments/rotate.py --group-from-name='-(\\d\\d)$' build/heldout/ravdess_unnamed build/rotated/unnamed_01-04 01,02,03,04
    python experiments/seeds.py build/rotated/ravdess_01-04 0,1,2,3,4 '{}'

`make bench-heldout` holds RAVDESS actors 09-12 out, always the same four: ten training seeds
average the training noise, not the choice of speakers. This writes a new bench-heldout folder
(`project/` and `truth.csv`) whose candidates are the clips of GROUPS, every other clip labelled
with its gold label (the source's labels and its truth.csv together); the stores are the source
project's, linked, not extracted again. A clip's group is the manifest's `group`, or, where the
manifest names none (`--unnamed`), the first capture of `--group-from-name` in the clip's name;
the rotated manifest keeps the source's groups, so an unnamed project stays unnamed. Then prints
each store with a logistic regression, plain and normalised per speaker, as the bench's rows,
the references the default is compared with. Nothing here trains a fusion: seeds.py does.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import re
import shutil
import sys
from pathlib import Path

from _project import project_config, project_folder, read_truth
from pipeline.bench.heldout import store_rows
from pipeline.manifest import read_manifest, write_manifest


def rotate(source: Path, out: Path, groups: set[str], group_from_name: str = "") -> dict[str, str]:
    """Writes `out` (project/ with linked features, truth.csv); returns the new truth."""
    folder = project_folder(source)
    truth = read_truth(source / "truth.csv")
    clips = read_manifest(folder / "data" / "manifest.jsonl")

    def group_of(name: str, group: str | None) -> str:
        if group:
            return group
        found = re.search(group_from_name, name) if group_from_name else None
        if not found:
            raise SystemExit(f"{name}: the manifest names no group; give --group-from-name (a regex whose "
                             "first group is the speaker, e.g. '-(\\d\\d)$' for RAVDESS file names)")
        return found.group(1)

    group = {c.name: group_of(c.name, c.group) for c in clips}
    missing = groups - set(group.values())
    if missing:
        raise SystemExit(f"no clip of group(s) {sorted(missing)} in {folder / 'data' / 'manifest.jsonl'}")
    rotated, new_truth = [], {}
    for clip in clips:
        label = clip.label or truth.get(clip.name)
        if group[clip.name] in groups:
            new_truth[clip.name] = label
            rotated.append(dataclasses.replace(clip, label=None, split="unlabelled", candidate=True))
        elif label:  # a clip of the source with no label anywhere stays unlabelled
            rotated.append(dataclasses.replace(clip, label=label, split="labelled", candidate=False))
        else:
            rotated.append(clip)
    project = out / "project"
    (project / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "params.yaml", project / "params.yaml")
    if not (project / "features").exists():
        (project / "features").symlink_to((folder / "features").resolve(), target_is_directory=True)
    write_manifest(rotated, project / "data" / "manifest.jsonl")
    with (out / "truth.csv").open("w", encoding="utf-8", newline="") as fh:  # as the bench writes it
        writer = csv.writer(fh)
        writer.writerow(["name", "discrete"])
        writer.writerows(new_truth.items())
    return new_truth


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a bench-heldout folder (project/ and truth.csv)")
    parser.add_argument("out", type=Path, help="the rotated bench-heldout folder to write")
    parser.add_argument("groups", help="the candidates' groups, comma-separated")
    parser.add_argument("--group-from-name", default="", help="regex: a clip's group from its name, where the "
                                                               "manifest names none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    truth = rotate(args.source, args.out, set(args.groups.split(",")), args.group_from_name)
    print(f"{args.out}: {len(truth)} candidates")
    speaker_stores = project_config(args.out).speaker_stores
    for row in store_rows(args.out / "project", truth, speaker_stores):
        print(f"  {row['row']}: weighted F1 {row['weighted_f1']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
