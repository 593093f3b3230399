"""`make bench`: the real-data benchmark on human-labelled corpora, through the project's own path.

For each corpus found under `--shared` (RAVDESS speech, actors 01-12; MELD train+dev
text) it converts to the MER2025 layout (`mer convert`), ingests, runs the stores that
apply with `--params`' extractor settings (params.yaml: `extract.prosody`, `extract.whisper`;
`extract.text` with `language: english`, as MELD has no Chinese), and scores under group-aware
5-fold cross-validation (actor for RAVDESS, dialogue for MELD):
- each store with a logistic regression (standardised, C 0.5), plain and, where every clip
  names a speaker of 20+ clips (RAVDESS), normalised per speaker first as the trainer does;
- the fusion trainer with `--params`' train section on the corpus' stores: the default kind,
  and on more than one store each other fusion kind with the same settings.
Every clip is labelled here, so the trainer's self-training pool is each scored fold with its
labels unread. Held out, in the MER protocol, is `make bench-heldout` (heldout.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.data import convert
from pipeline.config import EngineConfig, ExtractorSpec, IngestConfig, Params, load_params, store_spec
from pipeline.extract.engine import run_extraction
from pipeline.extractors.base import available
from pipeline.data.ingest import ingest
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip, write_manifest
from pipeline.data.splits import fold_indices
from pipeline.store import StoreReader
from pipeline.tables import markdown_table, write_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    name: str
    source: str  # folder under --shared
    protocol: str
    stores: dict[str, ExtractorSpec]


CORPUS_NAMES = ("ravdess", "meld")


def corpora(params: Params) -> tuple[Corpus, ...]:
    """RAVDESS with params' prosody and Whisper stores; MELD with its text store, English only."""
    text = store_spec(params, "text")
    return (
        Corpus("ravdess", "ravdess", "5-fold, split by actor",
               {"prosody": store_spec(params, "prosody"), "whisper": store_spec(params, "whisper")}),
        Corpus("meld", "meld", "5-fold, split by dialogue",
               {"text": replace(text, options={**text.options, "language": "english"})}),
    )


def store_path(folder: Path, store: str, spec: ExtractorSpec) -> Path:
    """`<store>-<settings digest>.h5`: a settings change in params.yaml extracts a new store beside
    the old one, instead of stopping on the old store's fingerprint."""
    settings = json.dumps({"extractor": spec.extractor, "options": spec.options}, sort_keys=True, default=str)
    return folder / f"{store}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}.h5"


def build(corpus: Corpus, shared: Path, work: Path) -> Path:
    """Convert the corpus into the MER layout once (reused on later runs)."""
    root = work / corpus.name / "dataset"
    if not root.exists():
        items, report = (convert.ravdess(shared / corpus.source) if corpus.name == "ravdess"
                         else convert.meld(shared / corpus.source))
        convert.write_layout(items, root, report)
        log.info("%s: %s", corpus.name, "; ".join(report.lines()))
    return root


def score(features: np.ndarray, clips: list[Clip], seed: int = 0) -> dict[str, float]:
    """Logistic regression, group-aware stratified 5-fold CV; out-of-fold predictions scored once."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = [c.label for c in clips]
    predicted = np.empty(len(clips), dtype=object)
    for train, val in fold_indices(labels, [c.group for c in clips], k=5, seed=seed):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
        model.fit(features[train], np.asarray(labels)[train])
        predicted[val] = model.predict(features[val])
    return {"weighted_f1": float(f1_score(labels, list(predicted), average="weighted")),
            "accuracy": float(accuracy_score(labels, list(predicted))), "n": len(clips)}


def per_speaker(store: str, values: np.ndarray, present: np.ndarray, names: list[str],
                groupings: list[list[str | None]]) -> np.ndarray:
    """One store's vectors normalised per speaker, as the trainer normalises its inputs
    (`normalize_by_groupings`; label-free), for a logistic regression beside the fusion."""
    from pipeline.fusion.features import Features, normalize_by_groupings

    one = Features(list(names), {store: values.astype(np.float32)}, present[:, None], [store])
    return normalize_by_groupings(one, groupings).inputs[store]


def store_rows(corpus: Corpus, store: str, spec: ExtractorSpec, features: np.ndarray,
               clips: list[Clip]) -> list[dict]:
    """The store with a logistic regression, plain and, where the clips name speakers the way
    `train.speaker_norm: auto` needs, normalised per speaker first (label-free: each speaker's
    own mean and spread), which tells the normalisation's gain apart from the fusion's."""
    from pipeline.fusion.features import speaker_groupings

    variants = [(f"{store} ({spec.extractor})", features)]
    groupings, kind, _ = speaker_groupings(clips, "auto", None)
    if groupings:
        variants.append((f"{store} ({spec.extractor}), normalised per speaker ({kind})",
                         per_speaker(store, features, np.ones(len(clips), bool), [c.name for c in clips], groupings)))
    return [{"dataset": corpus.name, "modality": name, "protocol": corpus.protocol, **score(values, clips)}
            for name, values in variants]


def run_corpus(corpus: Corpus, shared: Path, work: Path, engine: EngineConfig, params: Params) -> list[dict]:
    root = build(corpus, shared, work)
    clips = [c for c in ingest(IngestConfig(root=str(root))) if c.label]
    manifest = work / corpus.name / "manifest.jsonl"
    write_manifest(clips, manifest)
    rows, paths = [], {}
    for store, spec in corpus.stores.items():
        if spec.extractor not in available():
            log.warning("%s: extractor %s not available, skipped", corpus.name, spec.extractor)
            continue
        start = time.perf_counter()
        path = store_path(work / corpus.name, store, spec)
        run_extraction(store, spec, engine, manifest, path, progress=True)
        seconds = time.perf_counter() - start
        paths[store] = path
        with StoreReader(path) as reader:
            features, mask = reader.read("utterance", [c.name for c in clips])
        kept = [c for c, m in zip(clips, mask) if m]
        rows += [{**row, "extract_seconds": round(seconds, 1)}
                 for row in store_rows(corpus, store, spec, features[mask], kept)]
        log.info("%s", rows[-1])
    if paths:
        rows += fusion_rows(corpus, clips, list(paths), work / corpus.name, params)
    return rows


def fusion_rows(corpus: Corpus, clips: list[Clip], stores: list[str], feature_dir: Path,
                params: Params) -> list[dict]:
    """The trainer with params' train section on the corpus' stores, same folds: the default kind
    first, then, on more than one store, each other fusion kind with the same settings. What
    needs the project's other stages is not run here: `use_refined` / `use_pseudo` (the refine
    stage's labels) and `speaker_stores` (no voice store is extracted; RAVDESS names its actors)."""
    from pipeline.fusion.report import classification_metrics
    from pipeline.fusion.train import config_with, cross_validate, load_features

    cfg = params.train
    features = load_features(clips, stores, feature_dir, speaker_norm=cfg.speaker_norm)
    cfg = replace(cfg, stores=features.stores)
    gold = np.array([EMOTIONS.index(c.label) for c in clips])
    others = [k for k in ("ecmf", "mer_baseline", "concat") if k != cfg.model.kind] if len(features.stores) > 1 else []
    rows = []
    for kind in [cfg.model.kind, *others]:
        result = cross_validate(clips, features, config_with(cfg, kind=kind), quiet=True, fold_lines=False)
        metrics = classification_metrics(gold[result.labelled], result.oof_probs.argmax(1))
        trained = kind if result.model_kind == kind else f"{kind}, trains as {result.model_kind}"
        default = ", the default" if kind == cfg.model.kind else ""
        rows.append({"dataset": corpus.name, "modality": f"fusion {trained}{default} ({' + '.join(features.stores)})",
                     "protocol": corpus.protocol, "weighted_f1": metrics["weighted_f1"],
                     "accuracy": metrics["accuracy"], "n": len(result.labelled),
                     "train_seconds_per_fold": round(float(np.mean(result.seconds_per_fold)), 1)})
        log.info("%s", rows[-1])
    return rows


def to_markdown(rows: list[dict]) -> str:
    return markdown_table(["dataset", "modality / fusion", "protocol", "weighted F1", "accuracy", "n"],
                          ([r["dataset"], r["modality"], r["protocol"], f"{r['weighted_f1']:.4f}",
                            f"{r['accuracy']:.4f}", r["n"]] for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.real", description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--work", type=Path, default=Path("build/bench"))
    parser.add_argument("--out", type=Path, default=Path("reports/bench/real"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="the extractor settings and the train section the rows use")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = EngineConfig(device="auto", batch_size=16, flush_every=256, max_failed_fraction=0.02)
    rows = []
    for corpus in corpora(params):
        if not (args.shared / corpus.source).is_dir():
            print(f"skipped {corpus.name}: {args.shared / corpus.source} not found")
            continue
        rows += run_corpus(corpus, args.shared, args.work, engine, params)
    write_table(args.out, rows, to_markdown(rows))


if __name__ == "__main__":
    main()
