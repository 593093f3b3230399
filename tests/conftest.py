"""Tiny MER-layout datasets built in tmp_path; tests never read ../shared."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import toy_extractors  # noqa: F401 - registers the "toy" extractor
from fixtures_media import write_clip

from pipeline.config import EngineConfig, IngestConfig


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def build_dataset(root: Path, labels: dict[str, str], unlabelled: list[str], *,
                  video: bool = True, subtitles: bool = True, seconds: float = 0.6) -> Path:
    """A MER2025-layout folder: clips with a tone track, subtitles, labels, candidates."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(labels) + list(unlabelled)
    if video:
        (root / "video").mkdir()
        for i, name in enumerate(names):
            write_clip(root / "video" / f"{name}.mp4", seconds=seconds, fps=8, size=(64, 48),
                       tone_hz=200.0 + 40 * i)
    if subtitles:
        write_csv(root / "subtitle_chieng.csv", ["name", "chinese", "english"],
                  [[n, f"你好，{n}", f'He said "hi, {n}"\nthen left.'] for n in names])
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete", "valence"],
              [[n, lab, "0.5"] for n, lab in labels.items()])
    write_csv(root / "track_all_candidates.csv", ["name"], [[n] for n in unlabelled])
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    labels = {f"sample_{i:08d}": lab for i, lab in
              enumerate(["neutral", "angry", "happy", "sad", "worried", "surprise"])}
    return build_dataset(tmp_path / "ds", labels, ["sample_00000100", "sample_00000101"])


@pytest.fixture
def engine() -> EngineConfig:
    return EngineConfig(device="cpu", batch_size=2, decode_workers=2, flush_every=1,
                        flush_seconds=3600.0, max_failed_fraction=0.5)


@pytest.fixture
def ingest_cfg(dataset: Path) -> IngestConfig:
    return IngestConfig(root=str(dataset))
