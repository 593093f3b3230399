"""The extraction engine: manifest -> one extractor -> one resumable HDF5 store.

Decoding runs in background threads a few batches ahead, so the model rarely waits;
the model sees batches across clips. Per clip, an error is recorded and the run goes on;
the stage fails only when the failed fraction passes `engine.max_failed_fraction`.

`engine.runner` decides where the clips are computed: here (`local`), or on Ray actors
(`ray`, pipeline/extract/ray.py). Both run the same `ClipWorker` on each clip and hand its
results to the same writer (`RunWriter`, pipeline/extract/worker.py), so stores, failure records and resume are the same.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.config import EngineConfig, ExtractorSpec, as_dict
from pipeline.errors import ExtractionFailed, ModelMissing, ModelMissingError  # noqa: F401 - re-exported
from pipeline.extract.worker import (ClipResult, ClipWorker, ExtractSummary, RunWriter,  # noqa: F401
                                     _prefetch, check_device, decoder_threads, failure_record, resolve_device)
from pipeline.extractors.base import build_extractor
from pipeline.manifest import Clip, media_only, read_manifest
from pipeline.extract.reuse import Reuse, ReusingStoreWriter
from pipeline.store import DISABLED, StoreIdentity, StoreReader, write_empty_store, write_failures
from pipeline.tables import progress_bar, write_json

log = logging.getLogger(__name__)


def run_extraction(store: str, spec: ExtractorSpec, engine: EngineConfig, manifest_path: str | Path,
                   store_path: str | Path, summary_path: str | Path | None = None,
                   failures_path: str | Path | None = None, restart: bool = False,
                   progress: bool = True, section: str | None = None) -> ExtractSummary:
    """Extract every clip of the manifest that is not yet in the store. `section`: the params key
    of the spec, named in errors (default `extract.<store>`)."""
    section = section or f"extract.{store}"
    start = time.perf_counter()
    clips = read_manifest(manifest_path)
    extractor = build_extractor(spec.extractor, spec.options, section)
    on_ray = engine.runner == "ray"
    # Ray actors pick their own device (they may sit on GPU nodes the driver lacks).
    device = check_device(engine.device) if on_ray else resolve_device(engine.device)
    try:
        model = extractor.model_identity()
    except ModelMissing as err:
        raise ModelMissingError(err.for_store(store)) from None
    identity = StoreIdentity(store=store, extractor=spec.extractor, params=as_dict(extractor.options),
                             model=model, versions=extractor.versions())
    _drop_disabled(Path(store_path))
    writer = ReusingStoreWriter(store_path, identity, extractor.sequence_keys, restart=restart,
                                reuse=Reuse({c.name: clip_digest(c) for c in clips}, code_digest(), in_dvc_cache,
                                            device))
    summary = ExtractSummary(store=store, extractor=spec.extractor, device=device, clips=len(clips))
    todo = [c for c in clips if c.name not in writer.done]
    summary.skipped = len(clips) - len(todo)
    if writer.reused:
        log.info("%s: %d of %d clips taken from the previous run (%s); the others are new or changed",
                 store, len(writer.reused), len(clips), writer.previous)
    elif writer.not_reused_because not in ("", "no previous run described"):
        log.info("%s: no clip taken from the previous run: %s", store, writer.not_reused_because)
    run = RunWriter(store, extractor, writer, engine, summary)
    bar = progress_bar(len(todo), f"extract {store}", "clip", progress)
    try:
        if on_ray:
            from pipeline.extract.ray import extract_on_ray

            extract_on_ray(run, todo, bar)
        else:
            loading = time.perf_counter()
            extractor.load(device)  # after the fingerprint check: wrong settings fail before a model loads
            summary.load_seconds = time.perf_counter() - loading
            if (line := extractor.plan(todo)) is not None:
                log.info("%s: %s", store, line)
            for result in ClipWorker(store, extractor, summary).run(todo, engine.batch_size, engine.decode_workers,
                                                                   decoder_threads(engine)):
                run.take(result)
                bar.update(1)
    finally:
        bar.close()
        writer.flush()  # finished clips survive Ctrl-C and errors
        summary.counts = extractor.counts()
    summary.seconds = time.perf_counter() - start
    _finish(run, clips, Path(store_path), failures_path, summary_path)
    return summary


def clip_digest(clip: Clip) -> str:
    """What an extractor reads for a clip, hashed: its media paths, its media files' digest (read
    from data/media.jsonl, else computed as ingest does: `media_only`) and its subtitles. A clip
    whose digest changed is extracted again; labels, groups and candidacy are not in it."""
    media = clip.media_digest or media_only(clip).media_digest
    read = [clip.name, clip.video, clip.audio, clip.face_crops, media, clip.chinese, clip.english]
    return hashlib.sha256(json.dumps(read, ensure_ascii=True).encode()).hexdigest()[:16]


@functools.cache
def code_digest() -> str:
    """Every module of this package, hashed: a previous run's rows are reused only by the same code
    (a changed extractor, decoder or option default must extract every clip again)."""
    root = Path(__file__).resolve().parents[1]
    sha = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        sha.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()[:16]


def in_dvc_cache(md5: str) -> Path | None:
    """Where DVC's cache of the repository around the working directory keeps a file of this MD5
    (what DVC saved of a stage's output before removing it); None outside a DVC repository."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            return Path(repo.cache.local.oid_to_path(md5))
    except NotDvcRepoError:
        return None
    except Exception as err:  # noqa: BLE001 - a cache we cannot read only means nothing is reused
        log.info("DVC's cache could not be read (%s: %s): every clip is extracted", type(err).__name__, err)
        return None


def write_disabled(store: str, spec: ExtractorSpec, store_path: str | Path, summary_path: str | Path | None) -> None:
    """An empty store, no failures and a `disabled` summary for a stage switched off (`llm.enabled: false`).

    No extractor is built and no model loads. Finished or partial work of the real store under
    features/.partial/ is left alone: switching the LLM back on resumes it.
    """
    store_path = Path(store_path)
    write_empty_store(store_path, StoreIdentity(store=store, extractor=spec.extractor, params=DISABLED))
    write_failures(store_path.with_suffix(".failures.jsonl"), [])
    _write_summary(ExtractSummary(store=store, extractor=spec.extractor, device="none", clips=0),
                   summary_path, status="disabled")


def _drop_disabled(store_path: Path) -> None:
    """The empty store of a switched-off stage is not work to resume: switching it on starts afresh."""
    if store_path.is_file():
        with StoreReader(store_path) as reader:
            disabled = reader.disabled
        if disabled:
            store_path.unlink()


def _finish(run: RunWriter, clips: list[Clip], store_path: Path, failures_path: str | Path | None,
            summary_path: str | Path | None) -> None:
    summary, engine = run.summary, run.engine
    failures_path = Path(failures_path or store_path.with_suffix(".failures.jsonl"))
    order = {c.name: i for i, c in enumerate(clips)}  # deterministic whatever the engine's timing
    write_failures(failures_path, sorted(run.failures, key=lambda f: order.get(f["id"], len(order))))
    applicable = summary.clips - summary.not_applicable
    fraction = summary.failed / applicable if applicable else 0.0
    if fraction > engine.max_failed_fraction:
        _write_summary(summary, summary_path, status="failed")
        raise ExtractionFailed(
            f"extract.{summary.store}: {summary.failed} of {applicable} clips failed ({fraction:.0%} > params key "
            f"'engine.max_failed_fraction' = {engine.max_failed_fraction}): "
            f"{', '.join(f'{n} {kind}' for kind, n in run.failed_kinds.most_common())}; each clip and its error is "
            f"listed in {failures_path}. Fix or remove those clips and rerun (finished clips are kept, only the failed ones "
            "are retried), or raise engine.max_failed_fraction to go on without them."
        )
    start = time.perf_counter()
    rows = run.writer.finalize([c.name for c in clips])
    summary.write_seconds += time.perf_counter() - start
    _write_summary(summary, summary_path, status="ok")
    log.info("%s: %d clips in store (%d new, %d skipped, %d failed, %d without the modality) in %.1fs",
             summary.store, rows, summary.done, summary.skipped, summary.failed,
             summary.not_applicable, summary.seconds)


def _write_summary(summary: ExtractSummary, path: str | Path | None, status: str) -> None:
    if path is None:
        return
    data = {**asdict(summary), "status": status, "clips_per_second": summary.clips_per_second}
    write_json(path, {k: round(v, 4) if isinstance(v, float) else v for k, v in data.items()})
