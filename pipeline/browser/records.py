"""One record per clip for the error browser, joined from what earlier stages wrote.

Sources, all read as data: the manifest (subtitles, gold label, split, candidate), train's
`predictions_proba.csv` (probabilities and how each was made) and `clip_weights.csv` (modality
weights, empty where missing), refine's `labels.jsonl` (the refined label when it changed) and
the extraction failure records `features/*.failures.jsonl`.

Decisions:
- Rows, not objects: the page carries `COLUMNS` once and one list per clip, so 10,000 clips
  weigh about a third less; the page script turns rows back into objects by these names.
- Probabilities and weights as integers per 10,000 (two decimals of a percent): enough for
  bars and sorting, half the bytes of five-decimal floats.
- A thumbnail's file name is a digest of the clip name, never the name itself: a clip name is
  user data (it may hold `/`, `..`, quotes or markup), a digest is a safe, stable path.
- Loss is the cross-entropy of the gold class (−ln p, nats), only where the probabilities are
  out of fold; a labelled clip answered by the prior has no honest loss and sorts last.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path

from pipeline.errors import MerError
from pipeline.labels import EMOTIONS, EMOTION_INDEX
from pipeline.manifest import Clip

COLUMNS = ("name", "split", "candidate", "kind", "gold", "refined", "dropped", "probs", "confidence",
           "loss", "weights", "missing", "thumb", "chinese", "english", "failures")
SCALE = 10_000  # probabilities and weights are sent as integers out of this
MIN_PROB = 1e-6  # the loss of a probability rounded to 0 stays finite


class BrowserInputError(MerError, ValueError):
    """An input of the error browser is missing a column or disagrees with the manifest."""


def read_csv_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found; run `dvc repro train` first")
    with Path(path).open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        absent = [c for c in required if c not in (reader.fieldnames or [])]
        if absent:
            raise BrowserInputError(f"{path}: missing column(s) {absent}; rerun `dvc repro train`")
        return list(reader)


def read_refined(path: Path | None) -> dict[str, dict]:
    """name -> the refine row, for labelled clips whose label changed or that were flagged."""
    if path is None or not Path(path).is_file():
        return {}
    rows = (json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    return {r["name"]: r for r in rows if r.get("label") and (r.get("changed") or r.get("dropped"))}


def read_failures(feature_dir: Path) -> dict[str, list[list[str]]]:
    """name -> [[stage, kind, error], ...] from every `<store>.failures.jsonl` beside the stores."""
    out: dict[str, list[list[str]]] = {}
    for path in sorted(Path(feature_dir).glob("*.failures.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                out.setdefault(str(row.get("id")), []).append(
                    [str(row.get("stage", path.stem)), str(row.get("kind", "")), str(row.get("error", ""))])
    return out


def thumb_name(clip_name: str) -> str:
    """The thumbnail's file name for a clip (a digest: safe whatever the clip name holds)."""
    return hashlib.sha1(clip_name.encode("utf-8")).hexdigest()[:16] + ".jpg"


def existing_thumbs(clips: list[Clip], folder: Path, page_dir: Path) -> dict[str, str]:
    """clip name -> its thumbnail's path relative to the page, for the clips that have one."""
    out = {}
    for clip in clips:
        path = Path(folder) / thumb_name(clip.name)
        if path.is_file():
            out[clip.name] = Path(os.path.relpath(path, page_dir)).as_posix()
    return out


def _scaled(value: float) -> int:
    return int(round(float(value) * SCALE))


def clip_row(clip: Clip, proba: dict[str, str], weights: dict[str, str] | None, stores: list[str],
             refined: dict | None, failures: list[list[str]], thumb: str | None) -> list:
    """One clip's row in `COLUMNS` order."""
    probs = [float(proba[e]) for e in EMOTIONS]
    kind = proba["kind"]
    gold = EMOTION_INDEX[clip.label] if clip.label else None
    loss = None
    if gold is not None and kind == "labelled_oof":
        loss = round(-math.log(max(probs[gold], MIN_PROB)), 4)
    cells = {s: (weights or {}).get(s, "") for s in stores}
    refined_to = refined.get("refined") if refined and refined.get("changed") else None
    return [clip.name, "labelled" if clip.label else "unlabelled", int(proba["candidate"] == "1"), kind, gold,
            EMOTION_INDEX[refined_to] if refined_to in EMOTION_INDEX else None, int(bool(refined and refined.get("dropped"))),
            [_scaled(p) for p in probs], _scaled(max(probs)), loss,
            [_scaled(cells[s]) if cells[s] != "" else None for s in stores],
            [s for s in stores if cells[s] == ""], thumb, clip.chinese, clip.english, failures]


def clip_rows(clips: list[Clip], proba_csv: Path, weights_csv: Path, refined_jsonl: Path | None,
              feature_dir: Path, thumbs: dict[str, str]) -> tuple[list[str], list[list]]:
    """(stores, one row per clip in manifest order) for every clip train gave probabilities."""
    proba = {r["name"]: r for r in read_csv_rows(proba_csv, ("name", "kind", "candidate", *EMOTIONS))}
    weight_rows = read_csv_rows(weights_csv, ("name",))
    stores = [c for c in (list(weight_rows[0]) if weight_rows else []) if c != "name"]
    weights = {r["name"]: r for r in weight_rows}
    unknown = sorted(set(proba) - {c.name for c in clips})
    if unknown:
        raise BrowserInputError(f"{proba_csv} has {len(unknown)} clip(s) the manifest lacks (e.g. {unknown[:3]}); "
                                "train is older than the manifest: rerun `dvc repro`")
    refined, failures = read_refined(refined_jsonl), read_failures(feature_dir)
    rows = [clip_row(c, proba[c.name], weights.get(c.name), stores, refined.get(c.name),
                     failures.get(c.name, []), thumbs.get(c.name)) for c in clips if c.name in proba]
    return stores, rows
