"""`make bench-refine`: does label refinement find known label noise on real corpora?

Per corpus (RAVDESS speech by actor: prosody + Whisper stores; MELD text by dialogue:
the e5 store, when the `text` extractor is registered; each with `--params`' extractor settings,
bench.real.corpora), through the project's own path
(bench.real's conversion, ingest, run_extraction). Outer group-aware stratified 5-fold:
each outer fold holds ~20% of the groups out as an untouched test split; 10% and 20% of
the remaining training labels are flipped (seeded): to another class at random, or
(`cc`, class-conditional) to each class's most confusable one, as annotators err (the class
a cross-validated logistic regression on the clean training labels most often confuses it
with). Every method then runs on the SAME cross-fitted sources of the noisy training part:
the weighted vote and Dawid-Skene (ours in numpy, and crowd-kit's) at several thresholds,
and confident learning (cleanlab);
each flags clips, which are relabelled (mode hard) or left out (mode drop). Reported,
pooled over the outer folds run: flipped, flagged, flags that are flips (precision), flips
flagged (recall), detection F1, relabels that restore the truth, and the weighted F1 on the
test clips of bench.real's logistic regression trained on the noisy, the refined and the
clean labels (the ceiling).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np

from pipeline.bench.real import CORPUS_NAMES, Corpus, build, corpora, store_path
from pipeline.config import CLEANLAB_FILTERS, EngineConfig, IngestConfig, load_params, refine_config
from pipeline.extract.engine import run_extraction
from pipeline.extractors.base import available
from pipeline.data.ingest import ingest
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip, write_manifest
from pipeline.refine.vote import RefineConfig, aggregate, collect_votes, decide, drop_unreliable, gold_of
from pipeline.store import StoreReader
from pipeline.refine.weak import LightGBMConfig
from pipeline.tables import markdown_table, write_table

log = logging.getLogger(__name__)
THRESHOLDS = (0.5, 0.7, 0.9)
SETTINGS = ([(m, t) for m in ("weighted_vote", "dawid_skene/numpy", "dawid_skene/crowdkit") for t in THRESHOLDS]
            + [("cleanlab", None)])
# `--settings cleanlab`: every filter_by rule of confident learning on the same sources
CLEANLAB_SETTINGS = [(f"cleanlab/{rule}", None) for rule in CLEANLAB_FILTERS]
MODES = ("hard", "drop")
OUTER_FOLDS = {"ravdess": 5, "meld": 1}  # RAVDESS pooled over all 5; MELD one outer fold (all 5: ~33 min here)


def prepare(corpus: Corpus, shared: Path, work: Path, engine: EngineConfig,
            stores: list[str]) -> tuple[list[Clip], dict[str, np.ndarray]]:
    """Labelled clips present in every store, and each store's utterance vectors for them."""
    root = build(corpus, shared, work)
    clips = [c for c in ingest(IngestConfig(root=str(root))) if c.label]
    manifest = work / corpus.name / "manifest.jsonl"
    write_manifest(clips, manifest)
    names, keep, features = [c.name for c in clips], np.ones(len(clips), bool), {}
    for store in stores:
        path = store_path(work / corpus.name, store, corpus.stores[store])
        run_extraction(store, corpus.stores[store], engine, manifest, path, progress=True)
        with StoreReader(path) as reader:
            features[store], mask = reader.read("utterance", names)
        keep &= mask
    clips = [c for c, k in zip(clips, keep) if k]
    return clips, {s: x[keep].reshape(int(keep.sum()), -1) for s, x in features.items()}


def flip(gold: np.ndarray, rate: float, seed: int,
         confusable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): `rate` of the labels moved to another class seen in `gold`,
    at random, or to `confusable[c]` (class-conditional noise)."""
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(gold), bool)
    flipped[rng.choice(len(gold), size=round(rate * len(gold)), replace=False)] = True
    classes = np.unique(gold)
    noisy = gold.copy()
    for i in np.flatnonzero(flipped):
        noisy[i] = confusable[gold[i]] if confusable is not None else rng.choice(classes[classes != gold[i]])
    return noisy, flipped


def most_confusable(X: np.ndarray, gold: np.ndarray, seed: int) -> np.ndarray:
    """(6,) for each class, the other class a cross-validated LR on clean labels most often predicts."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    predicted = cross_val_predict(model, X, gold, cv=5)
    confusion = np.zeros((len(EMOTIONS), len(EMOTIONS)))
    np.add.at(confusion, (gold, predicted), 1)
    np.fill_diagonal(confusion, -1)
    present = np.isin(np.arange(len(EMOTIONS)), np.unique(gold))
    confusion[:, ~present] = -2  # never flip to a class the corpus lacks
    return confusion.argmax(axis=1)


def downstream(X: np.ndarray, labels: np.ndarray, test: np.ndarray) -> np.ndarray:
    """bench.real's logistic regression fitted on the training rows (~test); predicts the test rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    return model.fit(X[~test], labels).predict(X[test])


def run_fold(clips: list[Clip], X: np.ndarray, test: np.ndarray, rate: float, cfg: RefineConfig,
             work: Path, seed: int, class_conditional: bool = False,
             settings: list[tuple[str, float | None]] = SETTINGS) -> dict[tuple, dict]:
    """Flip `rate` of the training labels, refine them; counts + test predictions per setting."""
    gold = gold_of(clips)
    confusable = most_confusable(X[~test], gold[~test], seed) if class_conditional else None
    noisy, flipped = flip(gold[~test], rate, seed, confusable)
    train_clips = [dataclasses.replace(c, label=EMOTIONS[y]) for c, y in zip(np.array(clips)[~test], noisy)]
    votes = drop_unreliable(collect_votes(train_clips, cfg, work), noisy)  # the expensive part: once per fold
    out = {("noisy",): {"predicted": downstream(X, noisy, test)},
           ("clean",): {"predicted": downstream(X, gold[~test], test)}}
    Xtrain = X[~test]
    for method, threshold in settings:
        # dawid_skene/crowdkit: the same EM in crowd-kit; cleanlab/both: confident learning's `both` rule
        name, _, variant = method.partition("/")
        run = dataclasses.replace(cfg, method=name, correct_threshold=threshold or cfg.correct_threshold)
        if name == "dawid_skene":
            run = dataclasses.replace(run, dawid_skene=dataclasses.replace(cfg.dawid_skene,
                                                                         implementation=variant or "crowdkit"))
        elif variant:
            run = dataclasses.replace(run, cleanlab=dataclasses.replace(cfg.cleanlab, filter_by=variant))
        agg, weights = aggregate(votes, noisy, run)
        result = decide(train_clips, votes, agg, weights, run)  # mode hard: flagged = changed
        flagged = result.changed
        counts = {"flipped": int(flipped.sum()), "flagged": int(flagged.sum()),
                  "found": int((flagged & flipped).sum()),
                  "restored": int((flagged & (result.refined == gold[~test])).sum())}
        for mode in MODES:
            if mode == "hard":
                predicted = downstream(X, result.refined, test)
            else:  # drop: the flagged clips leave the training set
                keep = ~flagged
                predicted = downstream_rows(Xtrain[keep], noisy[keep], X[test])
            out[(method, threshold, mode)] = {**counts, "predicted": predicted}
    return out


def downstream_rows(X_train: np.ndarray, labels: np.ndarray, X_test: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5)).fit(X_train, labels).predict(X_test)


def _f1(truth: list[int], predicted: list[int]) -> float:
    from sklearn.metrics import f1_score

    return round(float(f1_score(truth, predicted, average="weighted")), 4)


def run_corpus(corpus: Corpus, stores: list[str], args: argparse.Namespace, engine: EngineConfig) -> list[dict]:
    """Outer group-aware folds: each holds out ~20% of the groups untouched; tallies pooled."""
    from pipeline.data.splits import fold_indices

    clips, features = prepare(corpus, args.shared, args.work, engine, stores)
    X = np.hstack([features[s] for s in stores]).astype(np.float64)
    gold = gold_of(clips)
    outer = fold_indices([c.label for c in clips], [c.group for c in clips], k=5, seed=args.seed)
    cfg = RefineConfig(stores=stores, k=5, seed=args.seed, lightgbm=LightGBMConfig(n_jobs=args.jobs))
    n_folds = args.folds or OUTER_FOLDS.get(corpus.name, 5)
    settings = CLEANLAB_SETTINGS if args.settings == "cleanlab" else SETTINGS
    rows = []
    for rate, cc in [(r, False) for r in args.noise] + [(r, True) for r in args.cc_noise]:
        tally: dict[tuple, dict] = {}
        truth: list[int] = []
        for f, (_, held) in enumerate(outer[:n_folds]):
            test = np.zeros(len(clips), bool)
            test[held] = True
            truth += gold[test].tolist()
            for key, part in run_fold(clips, X, test, rate, cfg, args.work / corpus.name, args.seed + f, cc,
                                      settings).items():
                into = tally.setdefault(key, {})
                for name, value in part.items():
                    into[name] = into.get(name, 0 if name != "predicted" else []) + (
                        value.tolist() if name == "predicted" else value)
            log.info("%s noise %.0f%%: outer fold %d done", corpus.name, 100 * rate, f + 1)
        base = {"dataset": corpus.name, "stores": "+".join(stores), "noise": rate,
                "noise_kind": "class-conditional" if cc else "uniform", "folds": min(n_folds, 5),
                "tested": len(truth), "f1_noisy": _f1(truth, tally[("noisy",)]["predicted"]),
                "f1_clean": _f1(truth, tally[("clean",)]["predicted"])}
        for (method, threshold, mode), t in ((k, v) for k, v in tally.items() if len(k) == 3):
            precision = t["found"] / t["flagged"] if t["flagged"] else 0.0
            recall = t["found"] / t["flipped"] if t["flipped"] else 0.0
            refined = _f1(truth, t["predicted"])
            rows.append({**base, "method": method, "threshold": threshold, "mode": mode,
                         "default": is_default(method, threshold, mode, args.defaults),
                         **{k: t[k] for k in ("flipped", "flagged", "found", "restored")},
                         "precision": round(precision, 4), "recall": round(recall, 4),
                         "detection_f1": round(2 * precision * recall / (precision + recall), 4)
                         if precision + recall else 0.0,
                         "f1_refined": refined, "recovered": recovered(base["f1_noisy"], refined, base["f1_clean"])})
            log.info("%s", rows[-1])
    return rows


def is_default(method: str, threshold: float | None, mode: str, defaults: RefineConfig) -> bool:
    """Is this row what params.yaml's `refine` runs? (`dawid_skene/crowdkit` names the method and
    its implementation; a threshold counts only for the methods that use one.)"""
    name, _, variant = method.partition("/")
    if name != defaults.method or mode != defaults.mode:
        return False
    if name == "cleanlab":
        return variant in ("", defaults.cleanlab.filter_by)
    if name == "dawid_skene" and variant and variant != defaults.dawid_skene.implementation:
        return False
    return threshold == defaults.correct_threshold


def recovered(noisy: float, refined: float, clean: float) -> float | None:
    """Share of the weighted F1 the noise cost that the refined labels win back (None: noise cost nothing)."""
    cost = clean - noisy
    return round((refined - noisy) / cost, 4) if cost > 1e-9 else None


def to_markdown(rows: list[dict]) -> str:
    return markdown_table(
        ["dataset", "noise", "folds", "method", "threshold", "mode", "flipped", "flagged", "precision", "recall",
         "detection F1", "restored", "F1 noisy", "F1 refined", "F1 clean", "recovered"],
        ([r["dataset"], f"{r['noise']:.0%}{' cc' if r['noise_kind'] != 'uniform' else ''}", r["folds"],
          f"**{r['method']}** (default)" if r.get("default") else r["method"],
          r["threshold"] if r["threshold"] is not None else "-", r["mode"], r["flipped"], r["flagged"],
          _num(r["precision"]), f"{r['recall']:.3f}", f"{r['detection_f1']:.3f}",
          r["restored"] if r["mode"] == "hard" else "-", f"{r['f1_noisy']:.4f}", f"{r['f1_refined']:.4f}",
          f"{r['f1_clean']:.4f}", "-" if r.get("recovered") is None else f"{r['recovered']:.0%}"] for r in rows))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def plan(args: argparse.Namespace) -> list[tuple[Corpus, list[str]]]:
    """Which corpora and stores run, with a message for each one skipped."""
    out = []
    for corpus in corpora(load_params(args.params)):
        if corpus.name not in args.corpora:
            continue
        if not (args.shared / corpus.source).is_dir():
            print(f"skipped {corpus.name}: {args.shared / corpus.source} not found")
            continue
        stores = [s for s, spec in corpus.stores.items() if spec.extractor in available()
                  and not (s == "whisper" and args.no_whisper)]
        for s in set(corpus.stores) - set(stores):
            print(f"{corpus.name}: store {s} ({corpus.stores[s].extractor}) skipped")
        if stores:
            out.append((corpus, stores))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.refine", description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--work", type=Path, default=Path("build/bench"))
    parser.add_argument("--out", type=Path, default=Path("reports/bench/refine"))
    parser.add_argument("--corpora", nargs="+", default=list(CORPUS_NAMES))
    parser.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--cc-noise", type=float, nargs="*", default=[0.2],
                        help="class-conditional noise rates (flips to the most confusable class)")
    parser.add_argument("--folds", type=int, default=None,
                        help="outer group folds to run per corpus (each holds out ~20%% of the groups; "
                             f"default {OUTER_FOLDS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1,
                        help="LightGBM threads (more than the free cores is many times slower)")
    parser.add_argument("--no-whisper", action="store_true", help="RAVDESS with prosody only (fast)")
    parser.add_argument("--settings", choices=("all", "cleanlab"), default="all",
                        help="all: every method and threshold; cleanlab: each cleanlab.filter_by rule")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="whose `refine` method and mode mark the rows `default`")
    args = parser.parse_args(argv)
    args.defaults = refine_config(load_params(args.params))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = EngineConfig(device="auto", batch_size=16, flush_every=256, max_failed_fraction=0.02)
    rows = []
    for corpus, stores in plan(args):
        rows += run_corpus(corpus, stores, args, engine)
    write_table(args.out, rows, to_markdown(rows))


if __name__ == "__main__":
    main()
