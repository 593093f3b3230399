"""`make bench`: the real-data benchmark on human-labelled corpora, through the project's own path.

For each corpus found under `--shared` (RAVDESS speech, actors 01-12; MELD train+dev
text) it converts to the MER2025 layout (`mer convert`), ingests, runs the offline
default extractors that apply, and scores each store with a plain logistic regression
under group-aware 5-fold cross-validation (actor for RAVDESS, dialogue for MELD). The
fusion stage will add its own rows; until then this fills the table from the first day.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import convert
from pipeline.config import EngineConfig, ExtractorSpec, IngestConfig
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


CORPORA = (
    Corpus("ravdess", "ravdess", "5-fold, split by actor", {
        "prosody": ExtractorSpec("numpy_prosody", {}),
        "whisper": ExtractorSpec("whisper_encoder", {"compute_type": "int8"}),  # as params.yaml pins it
    }),
    Corpus("meld", "meld", "5-fold, split by dialogue", {
        "text_e5": ExtractorSpec("text", {"backend": "e5", "language": "english"}),
    }),
)


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


def run_corpus(corpus: Corpus, shared: Path, work: Path, engine: EngineConfig) -> list[dict]:
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
        path = work / corpus.name / f"{store}.h5"
        run_extraction(store, spec, engine, manifest, path, progress=True)
        seconds = time.perf_counter() - start
        paths[store] = path
        with StoreReader(path) as reader:
            features, mask = reader.read("utterance", [c.name for c in clips])
        kept = [c for c, m in zip(clips, mask) if m]
        result = score(features[mask], kept)
        rows.append({"dataset": corpus.name, "modality": f"{store} ({spec.extractor})",
                     "protocol": corpus.protocol, **result, "extract_seconds": round(seconds, 1)})
        log.info("%s", rows[-1])
    if len(paths) > 1:
        rows += fusion_rows(corpus, clips, list(paths), work / corpus.name)
    return rows


def fusion_rows(corpus: Corpus, clips: list[Clip], stores: list[str], feature_dir: Path) -> list[dict]:
    """The fusion trainer on the corpus' stores: ECMF against the baseline fusions, same folds."""
    from pipeline.config import FusionConfig, TrainConfig
    from pipeline.fusion.report import classification_metrics
    from pipeline.fusion.train import cross_validate, load_features

    features = load_features(clips, stores, feature_dir)
    gold = np.array([EMOTIONS.index(c.label) for c in clips])
    rows = []
    for kind in ("ecmf", "mer_baseline", "concat"):
        cfg = TrainConfig(stores=stores, model=FusionConfig(kind=kind), folds=5, epochs=40)
        result = cross_validate(clips, features, cfg)
        metrics = classification_metrics(gold[result.labelled], result.oof_probs.argmax(1))
        rows.append({"dataset": corpus.name, "modality": f"fusion {kind} ({' + '.join(stores)})",
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = EngineConfig(device="auto", batch_size=16, flush_every=256, max_failed_fraction=0.02)
    rows = []
    for corpus in CORPORA:
        if not (args.shared / corpus.source).is_dir():
            print(f"skipped {corpus.name}: {args.shared / corpus.source} not found")
            continue
        rows += run_corpus(corpus, args.shared, args.work, engine)
    write_table(args.out, rows, to_markdown(rows))


if __name__ == "__main__":
    main()
