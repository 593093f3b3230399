"""`mer predict`: the trained pipeline on clips that were never ingested.

Extraction runs with the same extractor params as training (params.yaml), into a
temporary folder; the fold models of `models/fusion` are averaged. Models that use the
`text_enriched` store get the given subtitle enriched by the LLM of params `llm` first,
as the `enrich` stage does; with `llm.enabled: false` the LLM stores are read as missing. A clip without audio,
a face or a subtitle still gets an answer: the missing modality is masked, and named.
Models trained with speaker normalisation (`speaker_norm` in the checkpoint) need a batch of
one speaker's clips (`--same-speaker`, at least MIN_SPEAKER_CLIPS), normalised together as
training normalised each speaker; otherwise predict stops and says so.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ENRICHED_STORE, ExtractorSpec, FusionConfig, Params, store_spec
from pipeline.errors import MerError, TrainError
from pipeline.llm.enrich import enrich_from_params, enriched_manifest, read_enriched
from pipeline.extract.engine import resolve_device, run_extraction, write_disabled
from pipeline.fusion.checkpoint import load_folds, settings_change, store_settings
from pipeline.fusion import screen
from pipeline.fusion.linear import LinearFusion
from pipeline.fusion.models import build_fusion
from pipeline.data.ingest import MEDIA_EXTENSIONS, media_kind
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip, write_manifest
from pipeline.fusion.features import MIN_SPEAKER_CLIPS
from pipeline.fusion.train import Standardizer, load_features, predict

log = logging.getLogger(__name__)


def clips_for(paths: list[Path], english: str = "", chinese: str = "", group: str | None = None) -> list[Clip]:
    """One clip per path. Its name is the file's stem, made unique (`x`, `x~2`) where two paths share
    one (`a/x.mp4 b/x.mp4`, `x.mp4 x.wav`): the stores key clips by name (it stopped with "clip 'x'
    written twice"). The output names each clip by its path."""
    clips: list[Clip] = []
    taken: set[str] = set()
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        kind = media_kind(path)
        if kind is None:
            raise MerError(f"{path}: not a media file ({', '.join(MEDIA_EXTENSIONS)})")
        video, audio = (str(path), None) if kind == "video" else (None, str(path))
        name, n = path.stem, 1
        while name in taken:
            n += 1
            name = f"{path.stem}~{n}"
        taken.add(name)
        clips.append(Clip(name=name, video=video, audio=audio, english=english, chinese=chinese, group=group))
    return clips


def run_predict(paths: list[Path], params: Params, models: Path, english: str = "",
                chinese: str = "", same_speaker: bool = False) -> list[dict]:
    folds = load_folds(models)
    stores = folds[0]["stores"]
    speaker_norm = bool(folds[0].get("speaker_norm", False))
    if speaker_norm and (not same_speaker or len(paths) < MIN_SPEAKER_CLIPS):
        raise MerError(f"the models in {models} standardise every store per speaker (train.speaker_norm), so "
                       f"they need at least {MIN_SPEAKER_CLIPS} clips of one speaker at once, with --same-speaker "
                       f"(given: {len(paths)} clip(s){'' if same_speaker else ', no --same-speaker'}); or retrain "
                       "with train.speaker_norm: off")
    clips = clips_for(paths, english, chinese, group="speaker" if speaker_norm else None)
    with tempfile.TemporaryDirectory(prefix="mer-predict-") as tmp:
        manifest = Path(tmp) / "manifest.jsonl"
        write_manifest(clips, manifest)
        engine = replace(params.engine, max_failed_fraction=1.0)
        failures = {}
        for store in stores:
            spec, store_manifest = _spec_and_manifest(store, params, clips, manifest)
            if not params.llm.enabled and store in params.llm_stores():  # the models saw it; now it is missing
                write_disabled(store, spec, Path(tmp) / f"{store}.h5", None)
            else:
                run_extraction(store, spec, engine, store_manifest, Path(tmp) / f"{store}.h5", progress=False)
            change = settings_change(folds[0].get("store_settings", {}).get(store, ""),
                                     store_settings(Path(tmp) / f"{store}.h5"))
            if change:  # the same width, other values: the models would read features they never saw
                raise MerError(f"store {store!r}: the models in {models} were trained on it made with other "
                               f"settings ({change}); restore the params they were trained with, or retrain "
                               "(`dvc repro train`)")
            for line in (Path(tmp) / f"{store}.failures.jsonl").read_text().splitlines():
                row = json.loads(line)
                failures.setdefault(row["id"], {})[store] = row["kind"]
        features = load_features(clips, stores, tmp, dims=folds[0]["dims"],
                                 speaker_norm="on" if speaker_norm else "off")
    return _ensemble(clips, features, folds, failures)


def _spec_and_manifest(store: str, params: Params, clips: list[Clip], manifest: Path) -> tuple[ExtractorSpec, Path]:
    if store in params.extract:
        return params.extract[store], manifest
    if store == ENRICHED_STORE and params.text_enriched is not None and params.llm.enabled:
        rows, enriched = manifest.with_name("enriched.jsonl"), manifest.with_name("manifest_enriched.jsonl")
        enrich_from_params(clips, replace(params.llm, max_failed_fraction=1.0), rows,
                           resolve_device(params.engine.device))
        answers = read_enriched(rows)
        failed = [f"{r['name']}/{r['language']}: {r['status']}" for r in answers if r["status"] != "ok"]
        if failed:  # the enrich stage does the same within its max_failed_fraction; said here, not silent
            log.warning("%s: enrichment failed for %d subtitle(s), encoded as their plain subtitle instead, as the "
                        "enrich stage does: %s", store, len(failed), "; ".join(failed[:3]) + (" ..." if len(failed) > 3 else ""))
        write_manifest(enriched_manifest(clips, answers), enriched)
        return store_spec(params, store, ENRICHED_STORE), enriched
    if params.section_spec(store) is not None:
        return store_spec(params, store, store), manifest
    raise MerError(f"the models in use store {store!r}, which params no longer name; "
                   "restore its params or retrain")


def _ensemble(clips: list[Clip], features, folds: list[dict], failures: dict) -> list[dict]:
    usable = features.mask.any(axis=1)
    rows = np.flatnonzero(usable)
    probs = np.zeros((len(clips), len(EMOTIONS)))
    weights = np.zeros((len(clips), len(features.stores)))
    # each checkpoint's share: its blend_weight (a fold's members sum to 1); equal shares for
    # checkpoints written before the linear member existed
    shares = np.array([float(c.get("blend_weight", 1.0)) for c in folds])
    shares = shares / shares.sum()
    gates = [i for i, c in enumerate(folds) if c.get("head", "fusion") == "fusion"]  # modality weights: fusion members
    for i, ckpt in enumerate(folds):
        if ckpt.get("head", "fusion") == "linear":
            model = LinearFusion(ckpt["dims"])
        else:
            model = build_fusion(ckpt["dims"], FusionConfig(**ckpt["config"]["model"]))
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:  # e.g. ECMF's attention layer before it was written out (fewer keys)
            raise TrainError(f"fold {ckpt.get('fold')} model: its weights do not fit this version's "
                             f"{ckpt['config']['model']['kind']} model ({str(err).splitlines()[0]}); "
                             "retrain (`dvc repro train`)") from None
        norm = Standardizer.from_stats(ckpt["normalizer"])
        seen = screen.apply(features, ckpt.get("kept_stores", features.stores))  # the fold's screening (screen.py)
        if len(rows):
            p, w = predict(model, norm(seen, rows), torch.from_numpy(seen.mask[rows]))
            probs[rows] += shares[i] * p
            if i in gates:
                weights[rows] += w / len(gates)
    if not usable.all():
        if "prior" not in folds[0]:
            raise TrainError(f"{sum(~usable)} clip(s) have no usable modality and these models (trained before "
                             "the prior was saved) have no fallback; retrain (`dvc repro train`)")
        probs[~usable] = folds[0]["prior"].numpy()
    out = []
    for i, clip in enumerate(clips):
        missing = [s for j, s in enumerate(features.stores) if not features.mask[i, j]]
        out.append({
            "clip": clip.video or clip.audio, "emotion": EMOTIONS[int(probs[i].argmax())],
            "probabilities": {e: round(float(p), 4) for e, p in zip(EMOTIONS, probs[i])},
            "modality_weights": {s: round(float(w), 4) for s, w in zip(features.stores, weights[i])},
            "missing_modalities": {s: failures.get(clip.name, {}).get(s, "not present") for s in missing},
            "prediction": "model" if usable[i] else "prior_no_modality",
        })
    return out


def format_text(results: list[dict]) -> str:
    lines = []
    for r in results:
        probs = "  ".join(f"{e} {p:.2f}" for e, p in sorted(r["probabilities"].items(), key=lambda x: -x[1]))
        weights = "  ".join(f"{s} {w:.2f}" for s, w in r["modality_weights"].items())
        source = "" if r["prediction"] == "model" else "  (training prior: no usable modality)"
        lines += [f"{r['clip']}: {r['emotion']}{source}", f"  probabilities: {probs}",
                  f"  modality weights: {weights}"]
        if r["missing_modalities"]:
            lines.append("  missing: " + ", ".join(f"{s} ({why})" for s, why in r["missing_modalities"].items()))
    return "\n".join(lines)
