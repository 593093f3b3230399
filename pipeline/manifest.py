"""The manifest: one JSON line per clip, the single index every later stage reads.

JSON lines (not CSV) so subtitles with commas, quotes, newlines and any Unicode
round-trip exactly, and so the file stays readable with `pandas.read_json(lines=True)`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from pipeline.tables import write_jsonl

MEDIA_DIGEST_BYTES = 1 << 16  # read from each end of a media file for media_only's digest


@dataclass(frozen=True)
class Clip:
    name: str
    video: str | None = None  # path to the clip, when the dataset has video
    audio: str | None = None  # path to a 16 kHz wav, when the dataset ships one
    face_crops: str | None = None  # openface_face/{name}/{name}.npy, when present
    chinese: str = ""
    english: str = ""
    label: str | None = None  # one of pipeline.labels.EMOTIONS, or None when unlabelled
    valence: float | None = None
    split: str = "unlabelled"  # labelled | unlabelled
    candidate: bool = False  # listed in track_all_candidates.csv (clips to predict)
    group: str | None = None  # speaker / actor / dialogue, for group-aware splits
    media_digest: str | None = None  # data/media.jsonl only: its media files' sizes and ends (media_only)

    @property
    def has_video(self) -> bool:
        return self.video is not None

    @property
    def has_audio(self) -> bool:
        """Audio can come from a wav file or from the video's own track."""
        return self.audio is not None or self.video is not None

    @property
    def has_text(self) -> bool:
        return bool(self.chinese.strip() or self.english.strip())


def media_only(clip: Clip) -> Clip:
    """The clip without what annotators give (label, valence, split, candidate, group): what the
    extractors read. The `extract` stages depend on a manifest of these, so a relabelled clip or
    a new labels file reruns training, not hours of extraction.

    `media_digest` changes when a file is replaced under the same name (a corrupt clip fixed), so
    that clip's stores are extracted again: the paths alone would not change. It hashes each
    file's size and its first and last MEDIA_DIGEST_BYTES, not the whole file: ingest reruns on
    every labels edit, and reading a MER-scale corpus whole each time would take far longer than
    the training it precedes. A replacement of the same size that differs only in its middle
    goes unseen (`mer extract <store> --restart` redoes a store)."""
    digest = hashlib.blake2b(digest_size=8)
    for path in (clip.video, clip.audio, clip.face_crops):
        if path and Path(path).is_file():
            with open(path, "rb") as fh:
                size = fh.seek(0, 2)
                fh.seek(0)
                head = fh.read(MEDIA_DIGEST_BYTES)
                fh.seek(max(size - MEDIA_DIGEST_BYTES, 0))
                digest.update(f"{size}:".encode() + head + fh.read(MEDIA_DIGEST_BYTES))
    return replace(clip, label=None, valence=None, split="unlabelled", candidate=False, group=None,
                   media_digest=digest.hexdigest())


def write_manifest(clips: list[Clip], path: str | Path) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a manifest."""
    write_jsonl(path, (asdict(clip) for clip in clips))


def read_manifest(path: str | Path) -> list[Clip]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found; run `dvc repro ingest` first")
    known = {f.name for f in fields(Clip)}
    clips = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            unknown = set(row) - known
            if unknown:
                raise ValueError(f"{path}:{line_no}: unknown manifest field(s) {sorted(unknown)}")
            clips.append(Clip(**row))
    return clips
