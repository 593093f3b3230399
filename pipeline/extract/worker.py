"""One clip at a time, batched: what every engine runs on its clips, and the writing side.

`ClipWorker` prepares clips in background threads (decode, CPU preprocessing), runs the
model on batches across clips and isolates failures per clip. `RunWriter` takes its results
into the store (segments every `engine.flush_every` clips) and the failure records. The
local engine (`pipeline.extract.engine`) and the Ray engine (`pipeline.extract.ray`) both
use these two, so stores, failure records and resume are the same whichever runs.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline.config import EngineConfig
from pipeline.data import media
from pipeline.devices import check_device, resolve_device, usable_cpus  # noqa: F401 - re-exported
from pipeline.data.media import MediaError, NoAudioError, NoVideoError
from pipeline.extractors.base import Extractor, NotApplicable
from pipeline.manifest import Clip
from pipeline.store import StoreWriter

log = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    store: str
    extractor: str
    device: str
    clips: int = 0  # in the manifest
    not_applicable: int = 0  # clips without this modality, those whose media has no such track included
    no_track: int = 0  # of them: media without this modality's track (recorded in <store>.failures.jsonl)
    skipped: int = 0  # already in the store from an earlier run
    done: int = 0  # extracted by this run
    failed: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0  # loading the model (part of `seconds`; on Ray, in the actors and not counted)
    prepare_seconds: float = 0.0  # all of `prepare` (decoding + CPU preprocessing), summed over threads
    decode_seconds: float = 0.0  # the media-decoding part of it (PyAV), summed over threads
    model_seconds: float = 0.0
    write_seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)  # the extractor's own (`Extractor.counts`)

    @property
    def clips_per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


# A well-formed file without the extractor's track (a video corpus shot without sound, an audio-only
# MP4) lacks the modality, as a clip with no file of it does: it is recorded, with its kind, for the
# browser and `mer predict` to say why, but it is not a failure and does not count against
# engine.max_failed_fraction (a silent-video corpus stopped `dvc repro` at extract@prosody before).
MISSING_TRACK_KINDS = ("no_audio_track", "no_video_track")


def _failure_kind(err: BaseException, clip: Clip) -> str:
    if isinstance(err, NoAudioError):  # a file in audio/ without sound is broken, not a silent film
        return "unreadable_media" if clip.audio else "no_audio_track"
    if isinstance(err, NoVideoError):
        return "no_video_track"
    if isinstance(err, MediaError):
        return "unreadable_media"
    return "extractor_error"


def _timed_prepare(extractor: Extractor, clip: Clip) -> tuple[Any, float, float]:
    """(prepared item, seconds in prepare, seconds of it spent decoding media)."""
    start, decoded = time.perf_counter(), media.decode_seconds()
    item = extractor.prepare(clip)
    return item, time.perf_counter() - start, media.decode_seconds() - decoded


def decoder_threads(engine: EngineConfig, cpus: float | None = None) -> int:
    """FFmpeg threads per decoding clip: `engine.decoder_threads`, or `cpus` shared among the
    decode workers (the CPUs this process may use when None: devices.usable_cpus)."""
    if engine.decoder_threads:
        return engine.decoder_threads
    return max(1, int(cpus or usable_cpus()) // max(1, engine.decode_workers))


def _prefetch(extractor: Extractor, clips: list[Clip], workers: int, depth: int,
              threads_per_decoder: int = 0) -> Iterator[tuple[Clip, Future]]:
    """Yield (clip, future of prepared item) in manifest order, keeping `depth` in flight."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode",
                            initializer=media.set_decoder_threads, initargs=(threads_per_decoder,)) as pool:
        queue: deque[tuple[Clip, Future]] = deque()
        it = iter(clips)
        for clip in it:
            queue.append((clip, pool.submit(_timed_prepare, extractor, clip)))
            if len(queue) >= depth:
                break
        while queue:
            yield queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(_timed_prepare, extractor, nxt)))


@dataclass
class ClipResult:
    """What became of one clip: `outputs` when extracted, `failure` (the record) when it failed,
    neither when the clip lacks the extractor's modality."""

    name: str
    outputs: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None


def failure_record(store: str, modality: str, name: str, kind: str, error: str) -> dict[str, Any]:
    """One line of `<store>.failures.jsonl`."""
    return {"id": name, "stage": f"extract.{store}", "modality": modality, "kind": kind, "error": error}


class ClipWorker:
    """prepare + model with per-clip failure isolation: what every engine runs on its clips.

    The local engine runs one in its own process; the Ray engine runs one in each actor.
    Seconds spent preparing, decoding and in the model are added to `timings`.
    """

    def __init__(self, store: str, extractor: Extractor, timings: ExtractSummary,
                 model_lock: AbstractContextManager[Any] | None = None):
        self.store, self.extractor, self.timings = store, extractor, timings
        self.model_lock = model_lock or nullcontext()  # held around each model call

    def run(self, clips: list[Clip], batch_size: int, decode_workers: int,
            threads_per_decoder: int = 0) -> Iterator[ClipResult]:
        """Results in the order they are known; a batch's results come after its model call.
        `threads_per_decoder`: FFmpeg threads of each decode worker's video decoder (0: FFmpeg's)."""
        batch: list[tuple[Clip, Any]] = []
        for clip, future in _prefetch(self.extractor, clips, decode_workers, 2 * batch_size,
                                      threads_per_decoder):
            try:
                item, prepare_s, decode_s = future.result()
                self.timings.prepare_seconds += prepare_s
                self.timings.decode_seconds += decode_s
                batch.append((clip, item))
            except NotApplicable:
                yield ClipResult(clip.name)
            except Exception as err:  # noqa: BLE001 - per-clip boundary
                yield self.failed(clip, err)
            if len(batch) >= batch_size:
                yield from self.process(batch)
                batch = []
        if batch:
            yield from self.process(batch)

    def failed(self, clip: Clip, err: BaseException) -> ClipResult:
        log.debug("clip %s failed: %s", clip.name, err)
        return ClipResult(clip.name, failure=failure_record(
            self.store, self.extractor.modality, clip.name, _failure_kind(err, clip), str(err) or type(err).__name__))

    def process(self, batch: list[tuple[Clip, Any]]) -> list[ClipResult]:
        """Run the model on a batch; errors are isolated per clip."""
        try:
            outputs = self._model(batch)
        except Exception as err:  # noqa: BLE001 - per-clip boundary: record and go on
            if len(batch) == 1:
                return [self.failed(batch[0][0], err)]
            # one bad clip must not sink its batch: find it
            return [result for pair in batch for result in self.process([pair])]
        return [ClipResult(clip.name, outputs=out) for (clip, _), out in zip(batch, outputs)]

    def _model(self, batch: list[tuple[Clip, Any]]) -> list[dict[str, Any]]:
        with self.model_lock:
            start = time.perf_counter()
            outputs = self.extractor.extract_batch([item for _, item in batch])
            missing = [sorted(set(self.extractor.output_keys) - set(o)) for o in outputs]
            if len(outputs) != len(batch) or any(missing):
                raise RuntimeError(f"extractor {self.extractor.name} broke its output contract "
                                   f"(missing {next((m for m in missing if m), [])})")
            self.timings.model_seconds += time.perf_counter() - start
        return outputs


class RunWriter:
    """The writing side of one run: results in, store segments and failure records out."""

    def __init__(self, store: str, extractor: Extractor, writer: StoreWriter,
                 engine: EngineConfig, summary: ExtractSummary):
        self.store, self.extractor, self.writer = store, extractor, writer
        self.engine, self.summary = engine, summary
        self.failures: list[dict[str, Any]] = []  # every record, missing tracks included (failures.jsonl)
        self.failed_kinds: Counter[str] = Counter()  # the records that count as failures, by kind
        self.last_flush = time.monotonic()

    def take(self, result: ClipResult) -> None:
        if result.outputs is not None:
            self.write(result.name, result.outputs)
        elif result.failure is not None:
            if result.failure["kind"] in MISSING_TRACK_KINDS:
                self.summary.not_applicable += 1
                self.summary.no_track += 1
            else:
                self.summary.failed += 1
                self.failed_kinds[result.failure["kind"]] += 1
            self.failures.append(result.failure)
        else:
            self.summary.not_applicable += 1

    def write(self, name: str, out: dict[str, Any]) -> None:
        start = time.perf_counter()
        self.writer.add(name, out)
        self.summary.done += 1
        if (self.writer.pending >= self.engine.flush_every
                or time.monotonic() - self.last_flush >= self.engine.flush_seconds):
            self.writer.flush()
            self.last_flush = time.monotonic()
        self.summary.write_seconds += time.perf_counter() - start


