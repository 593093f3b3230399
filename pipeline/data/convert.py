"""Adapters that turn a known corpus, or a plain folder, into the MER2025 layout.

Each adapter validates its input, counts what it dropped and why, and writes into a
temporary sibling folder that is renamed into place only when everything succeeded, so an
error never leaves half a dataset. The speaker / actor / dialogue travels as a `group`
column of `track1_train_disdim.csv`, which ingest puts into the manifest for
group-aware splits.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.data.ingest import MEDIA_EXTENSIONS, media_kind
from pipeline.errors import MerError
from pipeline.labels import EMOTIONS

RAVDESS_EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry",
                    "06": "worried", "07": None, "08": "surprise"}  # 07 disgust has no MER class
RAVDESS_STATEMENTS = {"01": "Kids are talking by the door.", "02": "Dogs are sitting by the door."}
RAVDESS_NAME = re.compile(r"^(0[123])-(0[12])-(0[1-8])-(0[12])-(0[12])-(0[12])-(\d\d)$")
MELD_EMOTIONS = {"neutral": "neutral", "joy": "happy", "anger": "angry", "sadness": "sad",
                 "fear": "worried", "surprise": "surprise", "disgust": None}


class ConvertError(MerError, ValueError):
    """The source cannot be converted; nothing was written."""


@dataclass
class Item:
    name: str
    label: str
    group: str
    english: str = ""
    chinese: str = ""
    media: Path | None = None  # copied to video/ or audio/ as `media_kind` says (an Ogg video as .ogv)


@dataclass
class Report:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    labels: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [f"kept {self.kept} clips: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items()))]
        out += [f"dropped {v}: {reason}" for reason, v in sorted(self.dropped.items())]
        return out


@dataclass(frozen=True)
class Adapter:
    """One corpus adapter of `mer convert`: its help line, its own options, and the conversion."""

    help: str
    add_options: Callable[[Any], None]  # argparse subparser -> None
    convert: Callable[..., tuple[list[Item], Report]]  # (src, **options) -> items, report


ADAPTERS: dict[str, Adapter] = {}  # the one place a corpus adapter is made known


def register_adapter(name: str, help: str, add_options: Callable[[Any], None] = lambda parser: None):
    def wrap(func: Callable[..., tuple[list[Item], Report]]) -> Callable[..., tuple[list[Item], Report]]:
        if name in ADAPTERS:
            raise ValueError(f"adapter {name!r} registered twice")
        ADAPTERS[name] = Adapter(help, add_options, func)
        return func
    return wrap


def _ravdess_options(parser: Any) -> None:
    parser.add_argument("--calm", choices=["neutral", "drop"], default="neutral",
                        help="fold 'calm' into neutral (default) or drop it")


def _folder_options(parser: Any) -> None:
    parser.add_argument("--labels", type=Path, required=True, dest="labels_csv",
                        help="CSV name,label[,text][,group]")
    parser.add_argument("--label-map", type=Path, required=True, dest="label_map_csv",
                        help="CSV source,mer (mer may be 'drop')")


def write_layout(items: list[Item], dst: Path, report: Report) -> Report:
    """Write items as a MER2025 folder at `dst` (temp folder + rename; refuses to overwrite)."""
    dst = Path(dst)
    if dst.exists():
        raise ConvertError(f"{dst} already exists; choose a new folder or delete it first")
    if not items:
        raise ConvertError("nothing to write: every input row was dropped (" +
                           "; ".join(report.lines()[1:]) + ")")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_items(items, tmp)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.kept = len(items)
    report.labels = Counter(i.label for i in items)
    return report


def _write_items(items: list[Item], root: Path) -> None:
    root.mkdir(parents=True)
    for item in items:
        if item.media is None:
            continue
        kind = media_kind(item.media)  # an .ogg: its container decides, and Ogg video is written as .ogv
        suffix = ".ogv" if kind == "video" and item.media.suffix.lower() == ".ogg" else item.media.suffix.lower()
        (root / kind).mkdir(exist_ok=True)
        shutil.copyfile(item.media, root / kind / f"{item.name}{suffix}")
    with (root / "track1_train_disdim.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name", "discrete", "valence", "group"])
        writer.writerows([i.name, i.label, "", i.group] for i in items)
    if any(i.english or i.chinese for i in items):
        with (root / "subtitle_chieng.csv").open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["name", "chinese", "english"])
            writer.writerows([i.name, i.chinese, i.english] for i in items)


@register_adapter("ravdess", "RAVDESS speech / audio-visual files", _ravdess_options)
def ravdess(src: Path, calm: str = "neutral") -> tuple[list[Item], Report]:
    """RAVDESS files `MM-VC-EE-II-SS-RR-AA.ext` (03 audio-only, 01/02 audio-visual)."""
    if calm not in ("neutral", "drop"):
        raise ConvertError(f"calm must be 'neutral' or 'drop', not {calm!r}")
    report, items = Report(), []
    files = _files_under(Path(src))
    if not files:
        raise ConvertError(f"{src}: no files found; point SRC at the RAVDESS folder (Actor_01/...)")
    for path in files:
        match = RAVDESS_NAME.match(path.stem)
        if not match or path.suffix.lower() not in MEDIA_EXTENSIONS:
            report.dropped["not a RAVDESS media file name"] += 1
            continue
        modality, _, emotion, _, statement, _, actor = match.groups()
        if modality == "02":
            report.dropped["video-only file (02-...): no audio"] += 1
            continue
        label = RAVDESS_EMOTIONS[emotion]
        if label is None:
            report.dropped["disgust: no MER class"] += 1
            continue
        if label == "calm":
            if calm == "drop":
                report.dropped["calm (dropped by --calm drop)"] += 1
                continue
            label = "neutral"
        items.append(Item(name=path.stem, label=label, group=f"actor_{actor}",
                          english=RAVDESS_STATEMENTS[statement], media=path))
    return _dedupe(items, report), report


@register_adapter("meld", "MELD *_sent_emo.csv text")
def meld(src: Path) -> tuple[list[Item], Report]:
    """MELD CSVs (`*_sent_emo.csv`): text only; group = dialogue, speaker kept in the name's row."""
    report, items = Report(), []
    csvs = sorted(Path(src).glob("*_sent_emo.csv"))
    if not csvs:
        raise ConvertError(f"{src}: no *_sent_emo.csv files; point SRC at the MELD CSV folder")
    for path in csvs:
        split = path.name.split("_")[0]
        for row in _csv_rows(path, ("Utterance", "Emotion", "Dialogue_ID", "Utterance_ID")):
            emotion = row["Emotion"].strip().lower()
            if emotion not in MELD_EMOTIONS:
                report.dropped[f"unknown emotion {emotion!r}"] += 1
                continue
            if MELD_EMOTIONS[emotion] is None:
                report.dropped["disgust: no MER class"] += 1
                continue
            if not row["Utterance"].strip():
                report.dropped["empty utterance"] += 1
                continue
            items.append(Item(name=f"{split}_dia{row['Dialogue_ID']}_utt{row['Utterance_ID']}",
                              label=MELD_EMOTIONS[emotion], group=f"{split}_dia{row['Dialogue_ID']}",
                              english=row["Utterance"].strip()))
    return _dedupe(items, report), report


@register_adapter("folder", "any media folder + labels CSV + label map", _folder_options)
def folder(src: Path, labels_csv: Path, label_map_csv: Path) -> tuple[list[Item], Report]:
    """Any folder of media + `name,label[,text][,group]` + a `source,mer` label map (mer may be `drop`)."""
    mapping = {r["source"].strip().lower(): r["mer"].strip().lower()
               for r in _csv_rows(label_map_csv, ("source", "mer"))}
    bad = sorted({m for m in mapping.values() if m not in EMOTIONS and m != "drop"})
    if bad:
        raise ConvertError(f"{label_map_csv}: targets {bad} are not MER classes {list(EMOTIONS)} or 'drop'")
    media = {p.stem: p for p in _files_under(Path(src)) if p.suffix.lower() in MEDIA_EXTENSIONS}
    report, items = Report(), []
    for row in _csv_rows(labels_csv, ("name", "label")):
        name, source = row["name"].strip(), row["label"].strip().lower()
        if source not in mapping:
            raise ConvertError(f"{labels_csv}: label {source!r} of {name!r} is not in {label_map_csv}; "
                               "add a row for it (map it to a MER class or to 'drop')")
        if mapping[source] == "drop":
            report.dropped[f"label {source!r} mapped to drop"] += 1
            continue
        text = (row.get("text") or "").strip()
        if name not in media and not text:
            report.dropped["no media file and no text"] += 1
            continue
        items.append(Item(name=name, label=mapping[source], group=(row.get("group") or "").strip(),
                          english=text, media=media.get(name)))
    return _dedupe(items, report), report


def _files_under(src: Path) -> list[Path]:
    """Every file below `src`, sorted, through linked folders too: a corpus put together from links to
    its parts (`ln -s /data/ravdess/Actor_01 mine/`) is common, and `Path.rglob` does not follow them.
    A link back to a folder already walked is not walked again."""
    walked, files = set(), []
    for folder, subfolders, names in os.walk(src, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:
            subfolders[:] = []
            continue
        walked.add(real)
        files += [Path(folder) / n for n in names if (Path(folder) / n).is_file()]
    return sorted(files)


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[dict[str, str]]:
    if not Path(path).is_file():
        raise ConvertError(f"{path} not found")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ConvertError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
        yield from reader


def _dedupe(items: list[Item], report: Report) -> list[Item]:
    """Keep the first of several items with one name (e.g. the same clip as .mp4 and .wav)."""
    seen: set[str] = set()
    kept = []
    for item in items:
        if item.name in seen:
            report.dropped["duplicate clip name"] += 1
            continue
        seen.add(item.name)
        kept.append(item)
    return kept
