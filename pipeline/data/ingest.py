"""Read a dataset root in the MER2025 layout into a list of `Clip` records.

Layout (every part optional except that each clip needs media or a subtitle):
    video/{name}.mp4, audio/{name}.wav, openface_face/{name}/{name}.npy,
    subtitle_chieng.csv (name,chinese,english[,group]), track1_train_disdim.csv
    (name,discrete,valence[,group]), track_all_candidates.csv (name[,group]).
`group` names the speaker (or dialogue) wherever it is given.
Ingest only reads the layout; it does not decode media (extractors do, and record
per-clip failures), so ingesting 130k clips takes seconds. The one file it opens is an .ogg
in video/, to see whether it holds pictures (`media_kind`).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import IngestConfig
from pipeline.errors import MerError
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip

log = logging.getLogger(__name__)

# What PyAV's FFmpeg decodes, by the names corpora ship them under (CREMA-D's videos are .flv, many
# speech corpora's audio .mp3 / .m4a). A file of another suffix in these folders is not read, and
# ingest says so (it was dropped without a word, and its label row then "had no media").
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".flv", ".m4v", ".mpg", ".mpeg", ".ts", ".3gp",
                    ".wmv", ".ogv")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + AUDIO_EXTENSIONS


def media_kind(path: Path) -> str | None:
    """"video" or "audio" for a file of a suffix ingest reads, None for another suffix. The suffix
    decides, except for .ogg: Vorbis or Opus sound as a rule, Theora or VP8 video sometimes, so its
    container does (a video stream makes it video; Ogg keeps cover art in its comments, not as a
    stream). An .ogg that cannot be read counts as sound, and its store records why. Used by ingest
    (an .ogg in video/), `mer convert` and `mer predict`, so the three agree."""
    suffix = path.suffix.lower()
    if suffix == ".ogg":
        from pipeline.data.media import MediaError, probe  # PyAV: only when an .ogg needs it

        try:
            return "video" if probe(path).has_video else "audio"
        except MediaError:
            return "audio"
    return "video" if suffix in VIDEO_EXTENSIONS else "audio" if suffix in AUDIO_EXTENSIONS else None


class IngestError(MerError, ValueError):
    """The dataset breaks the layout; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class _Row:
    line: int  # 1-based line number in the CSV file, header = line 1
    values: dict[str, str]


def _read_csv(path: Path, required: tuple[str, ...]) -> list[_Row]:
    """Rows keyed by lower-cased header; utf-8 with or without BOM; quoted newlines kept."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise IngestError(
                    f"{path}: missing column(s) {missing}; header is {header}. "
                    f"Fix: the first line must name the columns {list(required)}"
                )
            reader.fieldnames = header
            rows = []
            for row in reader:
                values = {k: (v or "") for k, v in row.items() if k is not None}
                rows.append(_Row(reader.line_num, values))
            return rows
    except UnicodeDecodeError as err:
        raise IngestError(f"{path}: not UTF-8 ({err}). Fix: re-save the file as UTF-8") from err


def _index_files(folder: Path, extensions: tuple[str, ...], kind: str) -> dict[str, Path]:
    """Clip name -> file for the files of `folder` whose suffix is in `extensions` and, for an
    .ogg, whose container holds `kind` (media_kind: only the few .ogg files in video/ are opened)."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    unread: Counter[str] = Counter()
    twins: list[str] = []
    sound: list[str] = []  # .ogg files in video/ without a picture stream
    # a clip with two files is read from the one whose suffix comes first in `extensions` (the
    # layout's own .mp4 / .wav before a converted copy), whatever the names' sorted order
    rank = {suffix: i for i, suffix in enumerate(extensions)}
    files = [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()]
    for path in sorted(files, key=lambda p: (rank.get(p.suffix.lower(), len(rank)), p.name)):
        if path.suffix.lower() not in extensions:
            unread[path.suffix.lower() or "(no suffix)"] += 1
        elif kind == "video" and path.suffix.lower() == ".ogg" and media_kind(path) != "video":
            sound.append(path.name)
        elif path.stem in found:
            twins.append(path.name)
        else:
            found[path.stem] = path
    if unread:
        log.warning("%s: %d file(s) not read, by suffix %s; ingest reads %s. Fix: convert them (ffmpeg -i in out.mp4) "
                    "or move them out", folder, sum(unread.values()), dict(unread.most_common()), " ".join(extensions))
    if twins:
        log.warning("%s: %d file(s) share a clip name with another file and are not read: %s (a clip is read from "
                    "its file whose suffix comes first in %s)", folder, len(twins),
                    ", ".join(twins[:10]) + (" ..." if len(twins) > 10 else ""), " ".join(extensions))
    if sound:
        log.warning("%s: %d .ogg file(s) hold no video stream (or cannot be read) and are not read as video: %s. "
                    "Fix: move sound files to the audio folder (params key 'ingest.audio_dir')", folder, len(sound),
                    ", ".join(sound[:10]) + (" ..." if len(sound) > 10 else ""))
    return found


def _group(values: dict[str, str]) -> str | None:
    """A row's `group` cell, None when absent or blank: a cell of spaces names no speaker (as "", it
    was one shared group of every such clip, and the next file's group was never read)."""
    return (values.get("group") or "").strip() or None


def _index_face_crops(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.parent.name: p for p in sorted(folder.glob("*/*.npy")) if p.stem == p.parent.name}


def _unique_names(rows: list[_Row], path: Path) -> dict[str, _Row]:
    by_name: dict[str, _Row] = {}
    for row in rows:
        name = row.values["name"].strip()
        if not name:
            raise IngestError(f"{path}, line {row.line}: empty clip name. Fix: fill or delete the row")
        if name in by_name:
            raise IngestError(
                f"{path}, line {row.line}: duplicate clip name {name!r} "
                f"(first on line {by_name[name].line}). Fix: keep one row per clip"
            )
        by_name[name] = row
    return by_name


def _parse_label(row: _Row, path: Path) -> tuple[str, float | None]:
    label = row.values["discrete"].strip().lower()
    if label not in EMOTIONS:
        raise IngestError(
            f"{path}, line {row.line}: label {row.values['discrete']!r} for clip "
            f"{row.values['name']!r} is not one of {list(EMOTIONS)}. Fix: correct the label, "
            f"or map your corpus' labels onto these six before ingest"
        )
    raw = row.values.get("valence", "").strip()
    try:
        valence = float(raw) if raw else None
    except ValueError as err:
        raise IngestError(
            f"{path}, line {row.line}: valence {raw!r} is not a number. Fix: a number or an empty cell"
        ) from err
    return label, valence


def ingest(cfg: IngestConfig) -> list[Clip]:
    """Build the manifest records for the dataset at `cfg.root`, sorted by clip name."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise IngestError(f"dataset root {root} does not exist. Fix: set params key 'ingest.root'")
    # an .ogg in video/ is read when it holds a picture stream (Theora, VP8); in audio/ it is sound
    videos = _index_files(root / cfg.video_dir, (*VIDEO_EXTENSIONS, ".ogg"), "video")
    audios = _index_files(root / cfg.audio_dir, AUDIO_EXTENSIONS, "audio")
    crops = _index_face_crops(root / cfg.face_dir)

    subtitle_path, label_path, cand_path = (root / cfg.subtitle_file, root / cfg.label_file,
                                            root / cfg.candidate_file)
    subtitles = (_unique_names(_read_csv(subtitle_path, ("name",)), subtitle_path)
                 if subtitle_path.is_file() else {})
    labels = (_unique_names(_read_csv(label_path, ("name", "discrete")), label_path)
              if label_path.is_file() else {})
    candidates = (_unique_names(_read_csv(cand_path, ("name",)), cand_path)
                  if cand_path.is_file() else {})

    def has_media(name: str) -> bool:  # a file of the clip: video, audio or face crops
        return name in videos or name in audios or name in crops

    def exists(name: str) -> bool:  # the dataset knows the clip: media or a subtitle row
        return has_media(name) or name in subtitles

    # A row naming the file (`x.mp4`) instead of the clip (`x`) would be a clip of its own with no
    # media: a candidate answered by the prior under a name the organisers do not score. Refuse it.
    for path, rows in ((subtitle_path, subtitles), (label_path, labels), (cand_path, candidates)):
        for name, row in rows.items():
            stem, suffix = os.path.splitext(name)
            if (suffix.lower() in MEDIA_EXTENSIONS and (stem in videos or stem in audios)
                    and not has_media(name)):  # `news.ts` may be a clip
                raise IngestError(f"{path}, line {row.line}: {name!r} is a file name; the CSVs name clips without "
                                  f"the suffix. Fix: write {stem!r}")

    # A label row for a clip the dataset does not have is a typo: refuse it. A candidate is
    # kept whatever it has (the organisers score every candidate); see `unusable` below.
    for name, row in labels.items():
        if not exists(name):
            raise IngestError(
                f"{label_path}, line {row.line}: clip {name!r} has no media and no subtitle row under {root}. "
                f"Fix: add {cfg.video_dir}/{name}.mp4 (or audio / a subtitle row), or delete the row"
            )

    names = sorted(set(videos) | set(audios) | set(crops) | set(subtitles) | set(labels) | set(candidates))
    clips = []
    for name in names:
        sub = subtitles[name].values if name in subtitles else {}
        label, valence = _parse_label(labels[name], label_path) if name in labels else (None, None)
        # the speaker may be named by the label row, the subtitle row or the candidate row (an
        # unlabelled candidate has only the last two): folds and speaker normalisation use it
        group = ((_group(labels[name].values) if name in labels else None) or _group(sub)
                 or (_group(candidates[name].values) if name in candidates else None))
        clips.append(Clip(
            name=name,
            video=str(videos[name]) if name in videos else None,
            audio=str(audios[name]) if name in audios else None,
            face_crops=str(crops[name]) if name in crops else None,
            chinese=sub.get("chinese", ""),
            english=sub.get("english", ""),
            label=label, valence=valence,
            split="labelled" if label is not None else "unlabelled",
            candidate=name in candidates,
            group=group,
        ))
    # An unlabelled non-candidate with nothing to read is of no use; every other clip stays.
    clips = [c for c in clips if c.label or c.candidate or has_content(c)]
    empty = [c.name for c in clips if not has_content(c)]
    if empty:
        log.warning("%d clip(s) have no media and an empty subtitle (kept: candidates get the training prior, "
                    "labelled ones are left out of training): %s", len(empty),
                    ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))
    log.info("ingested %d clips from %s", len(clips), root)
    return clips


def has_content(clip: Clip) -> bool:
    """The clip has something to extract features from: media, face crops or a non-empty subtitle."""
    return clip.has_audio or clip.has_text or clip.face_crops is not None


def summarize(clips: list[Clip]) -> dict:
    """Counts per split, label and modality: the ingest stage's DVC metrics."""
    return {
        "clips": len(clips),
        "labelled": sum(c.split == "labelled" for c in clips),
        "unlabelled": sum(c.split == "unlabelled" for c in clips),
        "candidates": sum(c.candidate for c in clips),
        "with_video": sum(c.has_video for c in clips),
        "with_audio_file": sum(c.audio is not None for c in clips),
        "with_face_crops": sum(c.face_crops is not None for c in clips),
        "with_text": sum(c.has_text for c in clips),
        "without_content": sum(not has_content(c) for c in clips),
        "candidates_without_content": sum(c.candidate and not has_content(c) for c in clips),
        "labels": {k: v for k, v in sorted(Counter(c.label for c in clips if c.label).items())},
    }
