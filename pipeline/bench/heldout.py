"""`make bench-heldout`: the MER2025 protocol on public corpora, through the user's own path.

Each corpus under `--shared` is split by who speaks: RAVDESS actors 01-08 are the labelled
training set and actors 09-12 the unlabelled candidates; MELD train is labelled and MELD dev
the candidates (`--meld-train N` keeps a seeded sample of N training utterances, whole
dialogues). The candidates' labels go to `truth.csv` beside, never inside, the dataset root.

Then the default pipeline runs exactly as a user runs it: a fresh project folder holding this
repository's `dvc.yaml`, `params.yaml` (only `ingest.root` changed) and `pipeline/`, `git init`,
`dvc init`, `dvc repro train`; `reports/predictions.csv` is scored against `truth.csv`. From
the same project's stores, trained on the labelled clips only: each store alone with a
logistic regression, and each fusion kind with the default train params. Rows carry weighted
F1, accuracy and coverage (the share of candidates the row predicted from their own media
rather than a fallback).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from pipeline.config import load_params, train_config
from pipeline.data import convert
from pipeline.labels import EMOTIONS
from pipeline.manifest import read_manifest
from pipeline.tables import markdown_table, write_table

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
CORPORA = {"ravdess": "actors 01-08 -> 09-12", "meld": "MELD train -> dev"}


def split_items(corpus: str, items: list[convert.Item], meld_train: int, seed: int = 0):
    """(labelled, candidates): by actor for RAVDESS, by MELD split (dialogues sampled) for MELD."""
    if corpus == "ravdess":
        cands = [i for i in items if int(i.group.split("_")[-1]) >= 9]
        return [i for i in items if int(i.group.split("_")[-1]) < 9], cands
    train = [i for i in items if i.group.startswith("train_")]
    dialogues = sorted({i.group for i in train})
    random.Random(seed).shuffle(dialogues)
    kept, n = set(), 0
    for dialogue in dialogues:
        if meld_train and n >= meld_train:
            break
        kept.add(dialogue)
        n += sum(i.group == dialogue for i in train)
    return [i for i in train if i.group in kept], [i for i in items if i.group.startswith("dev_")]


def write_heldout(labelled: list[convert.Item], cands: list[convert.Item], root: Path, truth: Path,
                  groups: bool = True) -> None:
    """A MER2025 layout with labels for `labelled` only; the candidates' labels go to `truth`.
    `groups` false: no clip names its speaker or dialogue anywhere, as in MER2025's own files."""
    items = labelled + cands if groups else [replace(i, group="") for i in labelled + cands]
    convert.write_layout(items, root, convert.Report())
    group = ["group"] if groups else []
    with (root / "track1_train_disdim.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name", "discrete", "valence"] + group)
        writer.writerows([i.name, i.label, ""] + [i.group] * groups for i in labelled)
    with (root / "track_all_candidates.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name"] + group)
        writer.writerows([i.name] + [i.group] * groups for i in cands)
    with truth.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name", "discrete"])
        writer.writerows([i.name, i.label] for i in cands)


def make_project(project: Path, root: Path, overrides: dict) -> None:
    """A user's checkout: dvc.yaml, params.yaml (ingest.root and `overrides` changed), pipeline/.
    An existing project gets the current code and params and keeps its stores and DVC state, so
    `dvc repro` reruns only what the code or params changed (as `git pull` would for a user)."""
    new = not project.exists()
    project.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.rmtree(project / "pipeline", ignore_errors=True)
    shutil.copytree(REPO / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["ingest"]["root"] = str(root.resolve())
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        params[section][name] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True),
                                         encoding="utf-8")
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"]) if new else ():
        subprocess.run(args, cwd=project, check=True, env=_env())


def _env() -> dict[str, str]:
    # unbuffered: each stage's lines reach repro.log when they are printed, so their stamps are true
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
            "PYTHONUNBUFFERED": "1"}


def score(pred: dict[str, str], truth: dict[str, str], covered: int) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    names = sorted(truth)
    gold, guess = [truth[n] for n in names], [pred.get(n, "missing") for n in names]
    return {"weighted_f1": round(float(f1_score(gold, guess, average="weighted", labels=list(EMOTIONS),
                                                zero_division=0)), 4),
            "accuracy": round(float(accuracy_score(gold, guess)), 4),
            "coverage": round(covered / len(names), 4), "candidates": len(names)}


def _csv(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8", newline="") as fh:
        return {r["name"]: r["discrete"] for r in csv.DictReader(fh)}


def store_rows(project: Path, truth: dict[str, str], speaker_stores: list[str] = ()) -> list[dict]:
    """Each store with a standardised logistic regression: fit on the labelled clips, predict
    candidates. Where speaker normalisation applies (every clip names a speaker, or the voice
    store finds pseudo-speakers), each store also gets a row with its vectors normalised per
    speaker first, the way the default trains: that row tells the normalisation's gain apart
    from the fusion's."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.bench.real import per_speaker
    from pipeline.fusion.features import speaker_groupings, voice_store
    from pipeline.store import StoreReader

    clips = read_manifest(project / "data" / "manifest.jsonl")
    names = np.array([c.name for c in clips], dtype=object)
    gold = np.array([c.label for c in clips], dtype=object)
    labelled, cand = gold != None, np.isin(names, list(truth))  # noqa: E711 - elementwise
    majority = max(EMOTIONS, key=lambda e: int((gold == e).sum()))
    groupings, kind, _ = speaker_groupings(clips, "auto", voice_store(list(speaker_stores), project / "features"))

    def row(name: str, pred: dict[str, str]) -> dict:  # a candidate the store lacks gets the majority class
        return {"row": name, **score({n: pred.get(n, majority) for n in names[cand]}, truth, len(pred))}

    rows = []
    for path in sorted((project / "features").glob("*.h5")):
        with StoreReader(path) as reader:
            if reader.empty:
                continue
            x, mask = reader.read("utterance", list(names))
        x, scored = x.reshape(len(clips), -1), mask & cand
        if path.stem == "llm_labels":  # six class probabilities already
            rows.append(row(f"{path.stem} (zero-shot)",
                            {n: EMOTIONS[int(p.argmax())] for n, p in zip(names[scored], x[scored])}))
            continue
        variants = [(f"{path.stem} + LR", x)]
        if groupings and path.stem not in speaker_stores:
            variants.append((f"{path.stem} + LR, speaker-normalised ({kind})",
                             per_speaker(path.stem, x, mask, list(names), groupings)))
        for name, values in variants:
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
            model.fit(values[mask & labelled], gold[mask & labelled].astype(str))
            rows.append(row(name, dict(zip(names[scored], model.predict(values[scored]))) if scored.any() else {}))
    return rows


def fusion_rows(project: Path, truth: dict[str, str]) -> list[dict]:
    """Each fusion kind with the project's train params, trained on the labelled clips; candidates scored."""
    from pipeline.fusion.models import FUSION_MODELS
    from pipeline.fusion.features import voice_store
    from pipeline.fusion.train import config_with, cross_validate, load_features

    params = load_params(project / "params.yaml")
    cfg = train_config(params)
    clips = read_manifest(project / "data" / "manifest.jsonl")
    features = load_features(clips, cfg.stores, project / "features", speaker_norm=cfg.speaker_norm,
                             voices=voice_store(cfg.speaker_stores, project / "features"))
    rows = []
    for kind in FUSION_MODELS:
        start = time.perf_counter()
        result = cross_validate(clips, features, replace(config_with(cfg, kind=kind), stores=features.stores),
                                quiet=True, fold_lines=False)
        probs = dict(zip(result.unlabelled, result.unlabelled_probs))
        no_modality = result.no_modality if result.no_modality is not None else np.zeros(len(clips), bool)
        pred = {clips[i].name: EMOTIONS[int(p.argmax())] for i, p in probs.items() if clips[i].name in truth}
        covered = sum(1 for i in probs if clips[i].name in truth and not no_modality[i])
        trained = kind if result.model_kind == kind else f"{kind}, trains as {result.model_kind}"
        rows.append({"row": f"fusion {trained} ({' + '.join(features.stores)})", **score(pred, truth, covered),
                     "train_seconds_per_fold": round(float(np.mean(result.seconds_per_fold)), 1),
                     "cv_seconds": round(time.perf_counter() - start, 1)})
        log.info("%s", rows[-1])
    return rows


def run_corpus(corpus: str, shared: Path, work: Path, meld_train: int, overrides: dict,
               groups: bool = True) -> list[dict]:
    base = work / (corpus if groups else f"{corpus}_unnamed")
    root, truth_path, project = base / "dataset", base / "truth.csv", base / "project"
    if not root.exists():
        items, _ = convert.ravdess(shared / corpus) if corpus == "ravdess" else convert.meld(shared / corpus)
        labelled, cands = split_items(corpus, items, meld_train)
        base.mkdir(parents=True, exist_ok=True)
        write_heldout(labelled, cands, root, truth_path, groups)
    make_project(project, root, overrides)
    start = time.perf_counter()
    with (base / "repro.log").open("w", encoding="utf-8") as out:  # each line stamped: a stage's seconds
        repro = subprocess.Popen(["dvc", "repro", "train"], cwd=project, env=_env(), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in repro.stdout:
            out.write(f"[{time.perf_counter() - start:7.1f}s] {line}")
            out.flush()  # a run that is stopped keeps its log
        repro.wait()
    if repro.returncode:
        tail = (base / "repro.log").read_text(encoding="utf-8")[-2000:]
        raise SystemExit(f"{corpus}: dvc repro failed; see {base / 'repro.log'}\n{tail}")
    seconds = time.perf_counter() - start
    truth = _csv(truth_path)
    predictions = _csv(project / "reports" / "predictions.csv")
    proba = list(csv.DictReader((project / "reports" / "predictions_proba.csv").open(encoding="utf-8")))
    prior = sum(1 for r in proba if r["name"] in truth and r.get("no_modality") == "1")
    n_labelled = sum(1 for _ in csv.DictReader((root / "track1_train_disdim.csv").open(encoding="utf-8")))
    rows = [{"row": "default pipeline (dvc repro, predictions.csv)",
             **score(predictions, truth, len(truth) - prior), "repro_seconds": round(seconds)}]
    speaker_stores = train_config(load_params(project / "params.yaml")).speaker_stores
    rows += store_rows(project, truth, speaker_stores) + fusion_rows(project, truth)
    split = CORPORA[corpus] + ("" if groups else ", speakers unnamed")
    return [{"dataset": corpus, "split": split, "labelled": n_labelled, **r} for r in rows]


def to_markdown(rows: list[dict]) -> str:
    return markdown_table(["dataset", "split", "labelled", "row", "weighted F1", "accuracy", "coverage", "candidates"],
                          ([r["dataset"], r["split"], r["labelled"], r["row"], f"{r['weighted_f1']:.4f}",
                            f"{r['accuracy']:.4f}", f"{r['coverage']:.2f}", r["candidates"]] for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.heldout", description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--work", type=Path, default=Path("build/heldout"))
    parser.add_argument("--out", type=Path, default=Path("reports/bench/heldout"))
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    parser.add_argument("--meld-train", type=int, default=3000,
                        help="MELD training utterances kept (whole dialogues, seeded); 0: all")
    parser.add_argument("--unnamed", action="store_true",
                        help="write no group column anywhere (MER2025's own files name no speaker): "
                             "speaker normalisation must find speakers by voice")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="a params override for the projects, e.g. --set train.epochs=20")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    rows = []
    for corpus in args.corpora:
        if not (args.shared / corpus).is_dir():
            print(f"skipped {corpus}: {args.shared / corpus} not found")
            continue
        rows += run_corpus(corpus, args.shared, args.work, args.meld_train, overrides, groups=not args.unnamed)
    write_table(args.out, rows, to_markdown(rows))


if __name__ == "__main__":
    main()
