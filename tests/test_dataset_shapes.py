"""Every dataset shape runs through the real stages with default-like params, every candidate
gets exactly one prediction, and nothing non-finite reaches a report (issue: never silent garbage).

The projects are tiny MER-layout folders made here: audio-only (wav files), video without
subtitles, and sets with unusable labelled clips, labelled candidates, an empty-subtitle
candidate without media, and a class smaller than `train.folds`. The stages are the real
ones (`pipeline.stages.*`, as dvc.yaml calls them) with the real prosody, frames and text
extractors.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import yaml
from conftest import write_csv
from fixtures_media import write_clip, write_corrupt, write_wav

from pipeline.stages.check import main as check_main
from pipeline.stages.extract import main as extract_main
from pipeline.stages.ingest import main as ingest_main
from pipeline.stages.refine import main as refine_main
from pipeline.stages.train import main as train_main

EMOTIONS = ["neutral", "angry", "happy", "sad", "worried", "surprise"]
STORES = {
    "prosody": {"extractor": "numpy_prosody", "options": {"n_mfcc": 5}},
    "frames": {"extractor": "frames", "options": {"num_frames": 2, "max_side": 64}},
    "text": {"extractor": "text", "options": {"backend": "e5", "language": "both"}},
}


def _labels(per_class: dict[str, int]) -> dict[str, str]:
    return {f"clip_{label}_{i}": label for label, n in per_class.items() for i in range(n)}


def _tone(label: str, i: int) -> float:
    return 150.0 + 45 * EMOTIONS.index(label) + 3 * i  # pitch follows the class: prosody carries signal


def _params(root: Path, stores: list[str], folds: int = 3, **train) -> dict:
    return {
        "ingest": {"root": str(root)},
        "engine": {"device": "cpu", "batch_size": 4, "decode_workers": 1, "max_failed_fraction": 0.5},
        "extract": {s: STORES[s] for s in stores},
        "train": {"stores": stores, "folds": folds, "epochs": 3, "model": {"kind": "ecmf", "width": 16},
                  # the product defaults (params.yaml): every shape runs the linear member and store screening
                  "linear_weight": 0.5, "screen_stores": True,
                  **train},
        "refine": {"stores": ["prosody"], "label_stores": [], "k": folds},
    }


def _run(project: Path, params: dict, groups: bool = False) -> dict:
    """check -> ingest -> extract every store -> refine -> train, as `dvc repro` runs them."""
    params_path = project / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, allow_unicode=True))
    p = ["--params", str(params_path)]
    check_main([str(project / "reports" / "check.json"), *p])
    manifest = project / "data" / "manifest.jsonl"
    ingest_main([str(manifest), str(project / "reports" / "ingest.json"), *p])
    for store in params["extract"]:
        extract_main([store, str(manifest), str(project / "features" / f"{store}.h5"),
                      str(project / "reports" / "extract" / f"{store}.json"), *p, "--no-progress"])
    labels = project / "reports" / "refine" / "labels.jsonl"
    refine_main([str(manifest), str(labels), str(project / "reports" / "refine" / "summary.json"),
                 "--features", str(project / "features"), *p])
    train_main([str(manifest), str(project / "models"), str(project / "reports"), "--refined", str(labels),
                "--features", str(project / "features"), *p])
    return json.loads((project / "reports" / "metrics.json").read_text())


def _csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _assert_finite(value) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _assert_finite(v)
    elif isinstance(value, list):
        for v in value:
            _assert_finite(v)
    elif isinstance(value, float):
        assert math.isfinite(value)


def _assert_one_row_per_candidate(project: Path, candidates: list[str]) -> dict[str, dict]:
    submitted = _csv(project / "reports" / "predictions.csv")
    assert sorted(r["name"] for r in submitted) == sorted(candidates)  # each once, none missing
    assert {r["discrete"] for r in submitted} <= set(EMOTIONS)
    proba = {r["name"]: r for r in _csv(project / "reports" / "predictions_proba.csv")}
    for row in proba.values():
        values = [float(row[e]) for e in EMOTIONS]
        assert all(math.isfinite(v) for v in values) and abs(sum(values) - 1) < 1e-3
    return proba


def test_audio_only_set_with_broken_and_unusable_clips(tmp_path, caplog):
    """Audio only: `frames` and `text` stores carry nothing and are left out; a labelled clip whose
    wav is corrupt never trains; labelled candidates get their out-of-fold answer; an empty-subtitle
    candidate without media is kept and answered by the prior."""
    root = tmp_path / "ds"
    (root / "audio").mkdir(parents=True)
    labels = _labels({"neutral": 4, "angry": 4, "happy": 4, "sad": 4, "worried": 4, "surprise": 2})
    for i, (name, label) in enumerate(labels.items()):
        write_wav(root / "audio" / f"{name}.wav", seconds=0.5, tone_hz=_tone(label, i))
    write_corrupt(root / "audio" / "clip_angry_0.wav")  # labelled, and now without any usable modality
    unlabelled = ["cand_a", "cand_b"]
    for i, name in enumerate(unlabelled):
        write_wav(root / "audio" / f"{name}.wav", seconds=0.5, tone_hz=200.0 + 50 * i)
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete", "valence"],
              [[n, lab, ""] for n, lab in labels.items()])
    write_csv(root / "subtitle_chieng.csv", ["name", "chinese", "english"], [["cand_empty", "", " "]])
    candidates = unlabelled + ["cand_empty", "clip_happy_1", "clip_angry_0"]  # two labelled candidates
    write_csv(root / "track_all_candidates.csv", ["name"], [[n] for n in candidates])

    with caplog.at_level(logging.WARNING):
        metrics = _run(tmp_path, _params(root, ["prosody", "frames", "text"]))
    _assert_finite(metrics)
    assert metrics["stores"] == ["prosody"] and metrics["stores_without_clips"] == ["frames", "text"]
    assert metrics["model_kind"] == "single"  # one store: nothing to fuse
    assert metrics["excluded_no_modality"] == 1 and metrics["n_labelled"] == len(labels) - 1
    assert metrics["candidates"] == {"total": 5, "predicted_by_model": 3, "prior_no_modality": 2,
                                     "coverage": 0.6}
    assert metrics["speaker_independent"] is False
    assert 0 <= metrics["weighted_f1"] <= 1
    proba = _assert_one_row_per_candidate(tmp_path, candidates)
    assert proba["clip_happy_1"]["kind"] == "labelled_oof" and proba["clip_happy_1"]["candidate"] == "1"
    for name in ("cand_empty", "clip_angry_0"):
        assert proba[name]["kind"] == "prior_no_modality" and proba[name]["no_modality"] == "1"
    assert proba["cand_a"]["no_modality"] == "0"
    text = caplog.text
    assert text.count("store 'frames' carries nothing") == 1 and "store 'text' carries nothing" in text
    assert "clip_angry_0" in text and "no usable modality" in text
    assert "surprise (2)" in text and "train.folds" in text  # the class smaller than k, said once
    assert "not speaker-independent" in text
    failures = [json.loads(x) for x in (tmp_path / "features" / "prosody.failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["kind"]) for f in failures] == [("clip_angry_0", "unreadable_media")]
    ingest = json.loads((tmp_path / "reports" / "ingest.json").read_text())
    assert ingest["candidates_without_content"] == 1


def test_video_set_without_subtitles_and_with_speakers(tmp_path):
    """Video, no subtitle file: the text store is empty and left out; groups make the folds
    speaker-independent and the metrics say so."""
    root = tmp_path / "ds"
    (root / "video").mkdir(parents=True)
    labels = _labels({e: 3 for e in EMOTIONS})
    rows = []
    for i, (name, label) in enumerate(labels.items()):
        write_clip(root / "video" / f"{name}.mp4", seconds=0.5, fps=4, size=(48, 32), tone_hz=_tone(label, i))
        rows.append([name, label, "", f"speaker{i % 4}"])
    write_clip(root / "video" / "cand_x.mp4", seconds=0.5, fps=4, size=(48, 32))
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete", "valence", "group"], rows)
    write_csv(root / "track_all_candidates.csv", ["name"], [["cand_x"]])
    metrics = _run(tmp_path, _params(root, ["prosody", "frames", "text"]))
    _assert_finite(metrics)
    assert metrics["stores"] == ["prosody", "frames"] and metrics["stores_without_clips"] == ["text"]
    assert metrics["speaker_independent"] is True and metrics["excluded_no_modality"] == 0
    proba = _assert_one_row_per_candidate(tmp_path, ["cand_x"])
    assert proba["cand_x"]["kind"] == "unlabelled"


def test_video_set_without_any_audio_track(tmp_path, capsys):
    """Videos shot without sound: each audio store records every clip as `no_audio_track` but counts it
    as a clip without the modality, not a failure (this stopped `dvc repro` at extract@prosody:
    "27 of 27 clips failed"); training goes on with the frames store alone."""
    import numpy as np

    root = tmp_path / "ds"
    (root / "video").mkdir(parents=True)
    labels = _labels({e: 3 for e in EMOTIONS})
    for i, (name, label) in enumerate(labels.items()):
        image = np.full((32, 48, 3), 40 * EMOTIONS.index(label) + i, np.uint8)
        write_clip(root / "video" / f"{name}.mp4", seconds=0.5, fps=4, size=(48, 32), audio=None, image=image)
    write_clip(root / "video" / "cand_x.mp4", seconds=0.5, fps=4, size=(48, 32), audio=None)
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete", "valence"],
              [[n, lab, ""] for n, lab in labels.items()])
    write_csv(root / "track_all_candidates.csv", ["name"], [["cand_x"]])
    params = _params(root, ["prosody", "frames"])
    params["engine"]["max_failed_fraction"] = 0.1  # the product default
    metrics = _run(tmp_path, params)
    _assert_finite(metrics)
    assert metrics["stores"] == ["frames"] and metrics["stores_without_clips"] == ["prosody"]
    assert metrics["candidates"]["coverage"] == 1.0 and metrics["excluded_no_modality"] == 0
    _assert_one_row_per_candidate(tmp_path, ["cand_x"])
    summary = json.loads((tmp_path / "reports" / "extract" / "prosody.json").read_text())
    assert (summary["failed"], summary["not_applicable"], summary["no_track"]) == (0, 19, 19)
    failures = [json.loads(x) for x in (tmp_path / "features" / "prosody.failures.jsonl").read_text().splitlines()]
    assert len(failures) == 19 and {f["kind"] for f in failures} == {"no_audio_track"}
    assert "0 failed, 19 without prosody's modality (19 whose media has no such track" in capsys.readouterr().out


def test_an_audio_file_without_sound_is_a_failure_not_a_silent_film(tmp_path):
    """A file of audio/ with no audio stream (a misnamed video-only MP4) is broken: it counts as failed."""
    import shutil

    from pipeline.config import EngineConfig, ExtractorSpec, IngestConfig
    from pipeline.data.ingest import ingest
    from pipeline.extract.engine import run_extraction
    from pipeline.manifest import write_manifest

    root = tmp_path / "ds"
    (root / "audio").mkdir(parents=True)
    shutil.copy(write_clip(tmp_path / "mute.mp4", seconds=0.5, fps=4, size=(48, 32), audio=None),
                root / "audio" / "a.m4a")
    write_wav(root / "audio" / "b.wav", seconds=0.5)
    write_manifest(ingest(IngestConfig(root=str(root))), tmp_path / "m.jsonl")
    summary = run_extraction("prosody", ExtractorSpec("numpy_prosody", {}), EngineConfig(max_failed_fraction=0.5),
                             tmp_path / "m.jsonl", tmp_path / "p.h5", progress=False)
    assert (summary.done, summary.failed, summary.no_track) == (1, 1, 0)
    (failure,) = [json.loads(x) for x in (tmp_path / "p.failures.jsonl").read_text().splitlines()]
    assert failure["id"] == "a" and failure["kind"] == "unreadable_media" and "no audio stream" in failure["error"]


def test_no_store_with_clips_stops_with_one_line(tmp_path, capsys):
    root = tmp_path / "ds"
    root.mkdir()
    labels = _labels({e: 2 for e in EMOTIONS})
    write_csv(root / "subtitle_chieng.csv", ["name", "chinese", "english"], [[n, "", f"I am {lab}"]
                                                                            for n, lab in labels.items()])
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete"], list(labels.items()))
    with pytest.raises(SystemExit):
        _run(tmp_path, _params(root, ["prosody"], folds=2))  # text-only data, an audio store
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.stores" in err and "Traceback" not in err


def test_text_only_set_trains_on_text(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    labels = _labels({e: 3 for e in EMOTIONS})
    words = {"neutral": "the table is brown", "angry": "I hate this, get out", "happy": "what a wonderful day",
             "sad": "I miss her so much", "worried": "what if it goes wrong", "surprise": "wow, really? no way"}
    write_csv(root / "subtitle_chieng.csv", ["name", "chinese", "english"],
              [[n, "", f"{words[lab]} {i}"] for i, (n, lab) in enumerate(labels.items())] + [["c1", "", "wow"]])
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete"], list(labels.items()))
    write_csv(root / "track_all_candidates.csv", ["name"], [["c1"], ["c2"]])  # c2: nothing at all
    params = _params(root, ["prosody", "text"])
    params["refine"] = {"stores": ["prosody", "text"], "label_stores": [], "k": 3}
    metrics = _run(tmp_path, params)
    _assert_finite(metrics)
    assert metrics["stores"] == ["text"] and metrics["candidates"]["prior_no_modality"] == 1
    _assert_one_row_per_candidate(tmp_path, ["c1", "c2"])
    summary = json.loads((tmp_path / "reports" / "refine" / "summary.json").read_text())
    assert "carries nothing" in summary["skipped_sources"]["prosody"]
