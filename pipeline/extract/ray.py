"""Extraction on a Ray cluster: `engine.runner: ray` (the `extract.engine` of issue #8).

The only module that imports ray, and only when the runner is `ray`. Everything but the
place where clips are computed is the local engine's (pipeline/extract/engine.py): the same
extractor class and options, the same fingerprint, the same `StoreWriter` and flush policy,
the same failure records, threshold and summary. The `engine` settings are not in the
store's fingerprint, so a store begun locally can be finished on Ray and the other way round.

Design: one writer, on the driver.
  * The driver skips the clips already committed (`writer.done`) and cuts the rest into
    shards of at most `ray_batches_per_shard` batches, small enough that each worker gets
    about four (no worker idles at the tail).
  * Each worker is a Ray actor holding one loaded model (one per GPU, or per
    `ray_cpus_per_worker` CPUs). It runs `ClipWorker`, the local engine's prepare + batched
    model loop with its per-clip failure isolation, over a shard and returns the outputs
    (numpy dicts), the failure records and the clips without the modality.
  * Two shards per actor are in flight: while one is in the model (behind a lock, one batch
    at a time) the next one is decoding, so a GPU does not wait for the start of each shard.
    As a shard comes back the driver first sends that actor another, then writes the results
    through the local `RunWriter` (a segment every `flush_every` clips).
Why not a store per shard and a merge step: the segments already are small stores merged
at the end, and a clip's results (KB to a few hundred KB) cost the driver ~1-3 ms to write
against tens to hundreds of ms of model time, so one writer serves tens of GPUs (see
`make bench-scale`, `write_ms_per_clip`). One writer keeps one resume rule (`writer.done`),
needs no shared filesystem for the output, and leaves no half-merged shard stores behind.

Resume and faults.
  * Driver killed: committed segments stay and the rerun skips them, as locally. What was
    computed but not flushed (at most `flush_every` clips) and what was on the workers is redone.
  * Worker killed (OOM, node lost, a decoder crash): Ray reports the actor dead; the driver
    starts a new actor and requeues the lost shards, halved, the way a failing batch is split
    into clips locally. A requeued ("suspect") shard runs alone on its worker, so a death
    is then its own: a clip that kills `CLIP_ATTEMPTS` workers alone is recorded as a failure
    of kind `worker_died`, and the run goes on.
  * An exception a worker raises outside the per-clip boundary (a bug, weights missing on a
    node) stops the run as it would locally.
  * Each worker checks that its fingerprint (package versions, weights) equals the store's,
    so a node with other versions cannot silently write other values.

The cluster: `ray_address: null` starts a fresh local Ray for the run (or uses the one this
process is already connected to, e.g. in a notebook or the benchmark) and stops it after;
`ray_address: auto` or `host:6379` joins a cluster made with `ray start`. Workers run in the
driver's working directory, so the manifest's relative paths must resolve there on every
node (a shared filesystem mounted at the same path), and `pipeline` must be installed there.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pipeline.config import ConfigError, EngineConfig, as_dict
from pipeline.devices import usable_cpus
from pipeline.errors import ModelMissingError
from pipeline.extract.worker import (ClipResult, ClipWorker, ExtractSummary, RunWriter, decoder_threads,
                                     failure_record, resolve_device)
from pipeline.extractors.base import Extractor, ModelMissing
from pipeline.manifest import Clip
from pipeline.store import FingerprintMismatch, StoreIdentity, describe_changes

log = logging.getLogger(__name__)

CLIP_ATTEMPTS = 3  # a clip alone in its shard may kill this many workers before it counts as failed
SETUP_DEATHS = 3  # a worker slot whose actor dies this many times in a row while loading stops the run
SHARDS_PER_WORKER = 4  # shards are cut small enough that each worker gets about this many
IN_FLIGHT = 2  # shards per worker: one in the model while the next one decodes
last_run_stats: dict[str, Any] = {}  # workers, shards, deaths, seconds until all workers were ready
NOT_INSTALLED = "engine.runner is 'ray' but ray is not installed: pip install -e '.[ray]'"


def import_ray() -> Any:
    """`ray`, or a one-line ConfigError saying how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats prompt or upload
    try:
        import ray
    except ImportError:
        raise ConfigError(NOT_INSTALLED) from None
    return ray


class ShardWorker:
    """One Ray actor: `setup` loads the extractor once, then `run` takes shard after shard."""

    def __init__(self, store: str, extractor_cls: type[Extractor], options: dict[str, Any],
                 engine: EngineConfig, device: str, cwd: str):
        self.store, self.extractor_cls, self.options = store, extractor_cls, options
        self.engine, self.device, self.cwd = engine, device, cwd
        self.extractor: Extractor | None = None
        self.model_lock = threading.Lock()  # shards run side by side; the model takes one batch at a time

    def setup(self) -> dict[str, Any]:
        """Build and load the model; returns what the driver checks (fingerprint, device)."""
        if os.path.isdir(self.cwd):
            os.chdir(self.cwd)  # the manifest's relative paths resolve as on the driver
        threads = max(1, int(self.engine.ray_cpus_per_worker))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        extractor = self.extractor_cls(self.options)
        identity = StoreIdentity(store=self.store, extractor=extractor.name,
                                 params=as_dict(extractor.options), model=extractor.model_identity(),
                                 versions=extractor.versions())
        device = resolve_device(self.device)
        # Each worker owns its CPU slot: no oversubscription. Before the load too, because
        # onnxruntime sessions take torch's thread count when they are made.
        _limit_torch_threads(threads)
        extractor.load(device)
        _limit_torch_threads(threads)
        self.extractor = extractor
        import ray

        return {"fingerprint": identity.fingerprint, "inputs": identity.inputs(), "device": device,
                "node": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def run(self, clips: list[Clip]) -> tuple[list[ClipResult], dict[str, float]]:
        assert self.extractor is not None, "setup() first"
        timings = ExtractSummary(self.store, self.extractor.name, self.device)
        worker = ClipWorker(self.store, self.extractor, timings, self.model_lock)
        threads = decoder_threads(self.engine, self.engine.ray_cpus_per_worker)  # this actor's CPU slot
        results = list(worker.run(clips, self.engine.batch_size, self.engine.decode_workers, threads))
        return results, {"prepare_seconds": timings.prepare_seconds,
                         "decode_seconds": timings.decode_seconds, "model_seconds": timings.model_seconds}


@dataclass(eq=False)  # a shard is itself, not its contents
class _Shard:
    clips: list[Clip]
    suspect: bool = False  # was on a worker that died: runs alone on its worker from now on
    attempt: int = 0  # workers this clip, alone, has killed


@dataclass
class _Slot:
    actor: Any
    generation: int = 0  # bumped when the actor is replaced; calls to older ones are orphans
    setup_deaths: int = 0
    ready: bool = False
    running: list[_Shard] = field(default_factory=list)


class _Pool:
    """Actors, the shard queue and the driver loop that feeds `RunWriter`."""

    def __init__(self, ray: Any, run: RunWriter, bar: tqdm):
        self.ray, self.run, self.bar = ray, run, bar
        self.identity = run.writer.identity  # what the store holds; every worker must match it
        self.engine = run.engine
        self.queue: deque[_Shard] = deque()
        self.slots: list[_Slot] = []
        # ref -> (slot, the actor generation it was sent to, shard; None for the setup call)
        self.calls: dict[Any, tuple[int, int, _Shard | None]] = {}
        self.retryable = _retryable_errors(ray)
        self.started = time.perf_counter()
        self.stats: dict[str, Any] = {"workers": 0, "shards": 0, "shard_size": 0, "worker_deaths": 0,
                                      "ready_seconds": None}

    def plan(self) -> tuple[int, dict[str, float], str]:
        """Workers, each one's resources and its device, checked against the cluster."""
        engine = self.engine
        total = self.ray.cluster_resources()
        cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
        use_gpu = engine.device.startswith("cuda") or (engine.device == "auto" and gpus > 0)
        if use_gpu and gpus < 1:
            raise RuntimeError(f"params key 'engine.device' is {engine.device!r} but the Ray cluster has no "
                               "GPU; set it to 'cpu' or 'auto'")
        per = {"num_cpus": engine.ray_cpus_per_worker, "num_gpus": 1 if use_gpu else 0}
        auto = int(gpus) if use_gpu else int(cpus // engine.ray_cpus_per_worker)
        workers = engine.ray_workers or max(1, auto)
        if workers * per["num_cpus"] > cpus or workers * per["num_gpus"] > gpus:
            raise RuntimeError(
                f"params key 'engine.ray_workers' asks for {workers} workers of {per['num_cpus']:g} CPU"
                f"{' + 1 GPU' if use_gpu else ''} each; the Ray cluster has {cpus:g} CPUs, {gpus:g} GPUs")
        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES: inside it the GPU is plain "cuda".
        return workers, per, "cuda" if use_gpu else "cpu"

    def start(self, todo: list[Clip]) -> None:
        workers, per, device = self.plan()
        spec = self.run.extractor
        remote = self.ray.remote(ShardWorker).options(**per, max_concurrency=IN_FLIGHT,
                                                      max_restarts=0, max_task_retries=0)
        self._spawn = lambda: remote.remote(self.run.store, type(spec), as_dict(spec.options),
                                            self.engine, device, os.getcwd())
        size = max(1, min(self.engine.ray_batches_per_shard * self.engine.batch_size,
                          math.ceil(len(todo) / (SHARDS_PER_WORKER * workers))))
        self.queue.extend(_Shard(todo[i:i + size]) for i in range(0, len(todo), size))
        for i in range(workers):
            self.slots.append(_Slot(self._spawn()))
            self._setup(i)
        self.stats.update(workers=workers, shards=len(self.queue), shard_size=size)
        log.info("%s on Ray: %d clips in %d shards of <= %d on %d workers (%s each)", self.run.store,
                 len(todo), len(self.queue), size, workers, per)

    def _setup(self, i: int) -> None:
        slot = self.slots[i]
        self.calls[slot.actor.setup.remote()] = (i, slot.generation, None)

    def loop(self) -> None:
        while self.queue or any(shard is not None for _, _, shard in self.calls.values()):
            (ref,), _ = self.ray.wait(list(self.calls), num_returns=1)
            i, generation, shard = self.calls.pop(ref)
            current = generation == self.slots[i].generation
            if current and shard is not None:
                self.slots[i].running.remove(shard)
            try:
                value = self.ray.get(ref)
            except self.retryable as err:
                self._died(i, shard, err, current)
                continue
            except self.ray.exceptions.RayTaskError as err:  # raised by our code in the worker
                if isinstance(err.cause, ModelMissing):  # weights missing on a worker's node
                    raise ModelMissingError(err.cause.for_store(self.run.store)) from None
                raise
            if shard is None:
                self._ready(i, value)
            self._dispatch()  # before writing, so no worker waits on the disk
            if shard is not None:  # (a result that made it out of a since-dead actor counts too)
                self._take(*value)

    def _dispatch(self) -> None:
        """Up to IN_FLIGHT shards per worker; a suspect shard only ever runs alone."""
        for i, slot in enumerate(self.slots):
            while slot.ready and self.queue:
                shard = self.queue[0]
                alone = not slot.running
                if not alone and (shard.suspect or slot.running[0].suspect or len(slot.running) >= IN_FLIGHT):
                    break
                self.queue.popleft()
                slot.running.append(shard)
                self.calls[slot.actor.run.remote(shard.clips)] = (i, slot.generation, shard)

    def _ready(self, i: int, info: dict[str, Any]) -> None:
        if info["fingerprint"] != self.identity.fingerprint:
            changes = describe_changes(self.identity.inputs(), info["inputs"]) or ["(fingerprint differs)"]
            raise FingerprintMismatch(
                f"the Ray worker on {info['node']} would write other values than the driver's store "
                f"{self.run.writer.path}:\n  " + "\n  ".join(changes)
                + "\nInstall the same package versions and model weights on every node.")
        self.slots[i].ready, self.slots[i].setup_deaths = True, 0
        self.run.summary.device = info["device"]
        if self.stats["ready_seconds"] is None and all(slot.ready for slot in self.slots):
            self.stats["ready_seconds"] = time.perf_counter() - self.started  # cluster + model loads

    def _take(self, results: list[ClipResult], timings: dict[str, float]) -> None:
        for result in results:
            self.run.take(result)
            self.bar.update(1)
        for key, seconds in timings.items():
            setattr(self.run.summary, key, getattr(self.run.summary, key) + seconds)

    def _died(self, i: int, shard: _Shard | None, err: BaseException, current: bool) -> None:
        """Requeue the lost shard; replace slot i's actor unless an earlier error already did."""
        lines = str(err).strip().splitlines()
        reason = f"{type(err).__name__}: {lines[0] if lines else ''}"
        self.stats["worker_deaths"] += 1
        if shard is not None:
            log.warning("a Ray worker died during a shard of %d clip(s) (%s); retrying it on a new worker",
                        len(shard.clips), reason)
            self._requeue(shard, reason)
        if not current:
            return
        slot = self.slots[i]
        self.ray.kill(slot.actor, no_restart=True)
        deaths = slot.setup_deaths + (shard is None)
        if deaths >= SETUP_DEATHS:
            raise RuntimeError(f"Ray workers died {deaths} times in a row while loading the "
                               f"{self.run.store} model; last: {reason}")
        # Other shards on the dead actor come back as errors of the old generation: requeued then.
        self.slots[i] = _Slot(self._spawn(), generation=slot.generation + 1, setup_deaths=deaths)
        self._setup(i)
        self._dispatch()

    def _requeue(self, shard: _Shard, reason: str) -> None:
        """Halve a lost shard, the way a failing batch is split into clips; a clip that kills
        workers on its own CLIP_ATTEMPTS times is recorded as failed."""
        if len(shard.clips) > 1:
            half = (len(shard.clips) + 1) // 2
            self.queue.extendleft([_Shard(shard.clips[half:], suspect=True),
                                   _Shard(shard.clips[:half], suspect=True)])
        elif not shard.suspect or shard.attempt + 1 < CLIP_ATTEMPTS:
            # a death is the clip's own only when it ran alone (suspects always do)
            self.queue.appendleft(_Shard(shard.clips, suspect=True, attempt=shard.attempt + shard.suspect))
        else:
            name = shard.clips[0].name
            self.run.take(ClipResult(name, failure=failure_record(
                self.run.store, self.run.extractor.modality, name, "worker_died",
                f"the clip killed {CLIP_ATTEMPTS} Ray workers; last: {reason}")))
            self.bar.update(1)

    def stop(self) -> None:
        for slot in self.slots:
            self.ray.kill(slot.actor, no_restart=True)


def _retryable_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """A worker process or its node is gone: the shard's work is lost, not wrong."""
    exc = ray.exceptions
    return (exc.RayActorError, exc.WorkerCrashedError, exc.NodeDiedError, exc.ObjectLostError)


def connect(ray: Any, engine: EngineConfig) -> bool:
    """Join or start the cluster; True when this run must disconnect (and stop a local one)."""
    if ray.is_initialized():
        return False
    common = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if engine.ray_address is not None:
        ray.init(address=engine.ray_address, **common)
        return True
    # the CPUs this process may use (a container's limit), not the machine's: Ray's scheduler
    # would otherwise start more actors than there are cores to run them
    cpus = max(usable_cpus(), math.ceil(engine.ray_workers * engine.ray_cpus_per_worker))
    # The driver's import path, so actors import what it does (extractors registered outside
    # the package, e.g. by tests); installed packages are found either way.
    path = os.pathsep.join(p for p in [*sys.path, os.environ.get("PYTHONPATH", "")] if p)
    ray.init(address="local", num_cpus=cpus, runtime_env={"env_vars": {"PYTHONPATH": path}}, **common)
    return True


def extract_on_ray(run: RunWriter, todo: list[Clip], bar: tqdm) -> None:
    """Compute `todo` on Ray actors and write it through `run`; the caller flushes and finishes."""
    if not todo:
        return  # nothing left: no cluster to start
    ray = import_ray()
    pool = _Pool(ray, run, bar)  # its clock starts before the cluster does
    started = connect(ray, run.engine)
    try:
        pool.start(todo)
        pool.loop()
    finally:
        pool.stop()
        if started:
            ray.shutdown()
        last_run_stats.clear()
        last_run_stats.update(pool.stats)
        log.info("%s on Ray: %s", run.store, pool.stats)


def _limit_torch_threads(threads: int) -> None:
    """torch's intra-op threads, when torch is loaded (a torch-free extractor never imports it)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
