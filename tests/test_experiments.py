"""The experiment scripts behind the README's figures (experiments/): each one the README cites is in
the repository, each one there is cited, and seeds.py, nested.py and rotate.py run on a tiny
bench-heldout project and measure what it holds (the others need real corpora or minutes of training: by hand)."""

from __future__ import annotations

import csv
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_refine import _write_store

from pipeline.bench.heldout import _csv as read_truth  # the bench's own truth.csv reader
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_cites_every_experiment_script_and_each_one_it_cites_exists():
    cited = set(re.findall(r"experiments/([a-z_]+\.py)", (REPO / "README.md").read_text(encoding="utf-8")))
    present = {p.name for p in (REPO / "experiments").glob("*.py") if not p.name.startswith("_")}
    assert cited == present
    assert "build/exp/" not in (REPO / "README.md").read_text(encoding="utf-8")  # scripts a clone lacks


def _bench_project(base: Path) -> None:
    """A bench-heldout folder: 8 speakers of 36 clips, 6 labelled and 2 candidates; `signal` tells
    the emotion after per-speaker normalisation, `noise` tells nothing."""
    rng = np.random.default_rng(0)
    speaker, emotion = np.repeat(np.arange(8), 36), np.tile(np.arange(6), 48)
    clips = [Clip(name=f"c{i:03d}", label=EMOTIONS[emotion[i]] if speaker[i] < 6 else None, group=f"spk{speaker[i]}",
                  candidate=bool(speaker[i] >= 6)) for i in range(len(emotion))]
    project = base / "project"
    write_manifest(clips, project / "data" / "manifest.jsonl")
    signal = (2 * rng.standard_normal((6, 12))[emotion] + 5 * rng.standard_normal((8, 12))[speaker]
              + rng.standard_normal((len(emotion), 12)))
    _write_store(project / "features" / "signal.h5", "signal", {c.name: v for c, v in zip(clips, signal)})
    noise = rng.standard_normal((len(emotion), 6))
    _write_store(project / "features" / "noise.h5", "noise", {c.name: v for c, v in zip(clips, noise)})
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["train"].update(stores=["signal"], folds=3, epochs=4, speaker_stores=[], self_training_min_clips=0)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    with (base / "truth.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name", "discrete"])
        writer.writerows([c.name, EMOTIONS[e]] for c, e in zip(clips, emotion) if c.candidate)


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_seeds_and_nested_measure_a_bench_heldout_project(tmp_path):
    _bench_project(tmp_path)
    out = _run("experiments/seeds.py", "--extra", "noise", str(tmp_path), "0,1", "{}",
               '{"stores": ["noise"]}', '{"stores": ["signal", "noise"], "model": {"kind": "concat"}}')
    found = re.findall(r"CV (\d\.\d+) held out (\d\.\d+) s/fold [\d.]+ \| (\S+) (\S+)", out)
    assert len(found) == 3, out
    (signal_cv, signal_held, *seeds), (noise_cv, noise_held, *_), (both_cv, both_held, *_) = found
    assert float(signal_cv) > 0.8 and float(signal_held) > 0.8  # the per-speaker signal is found
    assert float(noise_cv) < 0.4 and float(noise_held) < 0.4  # a store that tells nothing scores near chance
    assert float(both_held) > 0.8
    assert all(re.fullmatch(r"\d\.\d{3}/\d\.\d{3}", s) for s in seeds)

    out = _run("experiments/seeds.py", str(tmp_path / "project"), "0", "{}")  # a project without truth.csv
    assert re.fullmatch(r"project \{\}: CV (\d\.\d+) s/fold [\d.]+ \| \d\.\d{3}\n", out), out
    assert out.split()[-1] == seeds[0].split("/")[0]  # seed 0's CV, as read through the bench-heldout folder

    out = _run("experiments/nested.py", str(tmp_path), "0")
    scores = dict(re.findall(r"(fold average \(a\)|one set on all \(b\)|both averaged) (\d\.\d+)", out.splitlines()[-1]))
    assert len(scores) == 3, out
    assert all(float(v) > 0.8 for v in scores.values()), out


def test_nested_one_model_set_trains_once_on_every_labelled_clip_and_answers_the_candidates():
    """nested.py's (b): cross_validate made to train one model set on all labelled clips; it scores
    no fold, answers every candidate from its features, and the trainer is itself again after."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import nested
    finally:
        sys.path.remove(str(REPO / "experiments"))
    from dataclasses import replace

    from pipeline.bench.train_speed import synthetic
    from pipeline.config import TrainConfig
    from pipeline.fusion import train as trainer

    clips, features = synthetic({"a": 96, "b": 32}, 240)
    clips = [replace(c, label=None, candidate=True) if i % 4 == 0 else c for i, c in enumerate(clips)]
    cfg = TrainConfig(stores=["a", "b"], folds=3, epochs=12, self_training=False)
    before = trainer.training_folds
    with nested.one_model_set():
        once = trainer.cross_validate(clips, features, cfg, quiet=True, fold_lines=False)
    assert len(once.fold_scores) == 1 and len(once.checkpoints) == cfg.ensemble + (cfg.linear_weight > 0)
    truth = [c for i, c in enumerate(synthetic({"a": 96, "b": 32}, 240)[0]) if i % 4 == 0]
    answers = [clips[i].name for i in once.unlabelled]
    assert answers == [c.name for c in truth]
    right = np.mean([EMOTIONS[int(p.argmax())] == c.label for p, c in zip(once.unlabelled_probs, truth)])
    assert right > 0.6  # learned from the labelled clips (chance: 1/6)
    assert trainer.training_folds is before
    again = trainer.cross_validate(clips, features, cfg, quiet=True, fold_lines=False)
    assert len(again.fold_scores) == 3


def test_rotate_makes_other_speakers_the_candidates_on_the_same_stores(tmp_path):
    """rotate.py: the named groups' clips become candidates (their labels only in truth.csv), the
    source's candidates are labelled with their truth, the stores are the source's own, and the
    bench's LR references are printed for the new split."""
    source = tmp_path / "source"
    _bench_project(source)
    out = _run("experiments/rotate.py", str(source), str(tmp_path / "rotated"), "spk0,spk1")
    rotated = tmp_path / "rotated"
    before = {c.name: c for c in read_manifest(source / "project" / "data" / "manifest.jsonl")}
    after = {c.name: c for c in read_manifest(rotated / "project" / "data" / "manifest.jsonl")}
    source_truth, truth = read_truth(source / "truth.csv"), read_truth(rotated / "truth.csv")
    assert sorted(truth) == sorted(n for n, c in before.items() if c.group in ("spk0", "spk1"))
    assert all(truth[n] == before[n].label for n in truth)
    assert all(after[n].candidate and after[n].label is None and after[n].split == "unlabelled" for n in truth)
    assert all(after[n].label == source_truth[n] and not after[n].candidate for n in source_truth)
    assert all(after[n].group == before[n].group for n in before)
    assert (rotated / "project" / "features").resolve() == (source / "project" / "features").resolve()
    rows = dict(re.findall(r"  (.+): weighted F1 (\d\.\d+)", out))
    assert float(rows["signal + LR, speaker-normalised (named)"]) > 0.8, out  # the signal, per speaker
    assert float(rows["noise + LR"]) < 0.4, out
    assert out.startswith(f"{rotated}: 72 candidates")

    clips = [dataclasses.replace(c, group=None) for c in before.values()]  # as --unnamed writes them
    write_manifest(clips, source / "project" / "data" / "manifest.jsonl")
    done = subprocess.run([sys.executable, "experiments/rotate.py", str(source), str(tmp_path / "r2"), "spk0"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "the manifest names no group; give --group-from-name" in done.stderr
