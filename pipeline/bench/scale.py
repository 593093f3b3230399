"""Scale-out benchmark: one store extracted locally, then on Ray with 1 and with 2 workers.

    python -m pipeline.bench.scale --store frames --clips 80      (make bench-scale)

All runs use the same extractor and params on the same first N clips of the dataset in
params (`ingest.root`), in this process, each into a fresh temporary store; the Ray runs
share one cluster (a local one, or `engine.ray_address`), started before the clock runs.
clips/s is the engine's own figure: manifest read to finalized store, so it includes
each run's model load (in every worker, for Ray). The stores are compared with the local
one. Writes `reports/bench/scale.json`.

The default store is `frames` (EfficientNet-Lite0 on 8 frames per clip): model compute
dominates, as it does for every GPU extractor, so it shows what adding workers buys. The
prosody store is a poor probe: it does 15 clips/s on one core, so the few seconds each
worker spends starting would be most of what is measured.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.tables import write_json
from pipeline.config import EngineConfig, ExtractorSpec, load_params
from pipeline.extract.engine import ExtractSummary, run_extraction
from pipeline.extract.ray import connect, import_ray, last_run_stats
from pipeline.data.ingest import ingest
from pipeline.manifest import write_manifest
from pipeline.store import StoreReader


def max_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two stores with the same clips and keys."""
    with StoreReader(a) as left, StoreReader(b) as right:
        if left.names != right.names or left.keys != right.keys:
            raise AssertionError(f"{a} and {b} hold other clips or outputs")
        return max((float(np.max(np.abs(x[k].astype(np.float64) - y[k]), initial=0.0))
                    for x, y in ((left.get(n), right.get(n)) for n in left.names) for k in left.keys),
                   default=0.0)


def _row(label: str, workers: int | None, summary: ExtractSummary) -> dict[str, Any]:
    ready = last_run_stats.get("ready_seconds") if label == "ray" else None
    return {"engine": label, "workers": workers, "clips": summary.done, "failed": summary.failed,
            "seconds": round(summary.seconds, 2), "clips_per_second": round(summary.clips_per_second, 3),
            # Ray: the seconds until every worker had its model loaded, and the rate after that
            "startup_seconds": round(ready, 2) if ready else None,
            "clips_per_second_after_startup": round(summary.done / (summary.seconds - ready), 3) if ready else None,
            "model_seconds_summed": round(summary.model_seconds, 2), "device": summary.device,
            # the single writer's cost: what bounds a cluster's rate at 1000 / this clips/s
            "write_ms_per_clip": round(1000 * summary.write_seconds / max(1, summary.done), 2)}


def bench(store: str, spec: ExtractorSpec, engine: EngineConfig, manifest: Path, work: Path,
          workers: list[int]) -> dict[str, Any]:
    runs, load_before = [], os.getloadavg()[0]  # other work on the machine skews every figure
    local_store = work / "local" / f"{store}.h5"
    local_store.parent.mkdir(parents=True)
    summary = run_extraction(store, spec, replace(engine, runner="local"), manifest, local_store,
                             progress=False)
    runs.append(_row("local", None, summary) | {"max_abs_diff_vs_local": 0.0})
    ray = import_ray()
    cluster = replace(engine, runner="ray", ray_workers=max(workers))
    started = connect(ray, cluster)
    try:
        for n in workers:
            path = work / f"ray{n}" / f"{store}.h5"
            path.parent.mkdir(parents=True)
            summary = run_extraction(store, spec, replace(cluster, ray_workers=n), manifest, path,
                                     progress=False)
            runs.append(_row("ray", n, summary) | {"max_abs_diff_vs_local": max_difference(local_store, path)})
    finally:
        if started:
            ray.shutdown()
    ray_runs = {r["workers"]: r for r in runs if r["engine"] == "ray"}

    def ratio(key: str) -> float | None:
        if 1 in ray_runs and 2 in ray_runs and ray_runs[1][key]:
            return round(ray_runs[2][key] / ray_runs[1][key], 2)
        return None

    return {"store": store, "extractor": spec.extractor, "options": spec.options,
            "clips": runs[0]["clips"], "cpus": os.cpu_count(), "ray_address": engine.ray_address,
            "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "engine_settings": {"batch_size": engine.batch_size, "decode_workers": engine.decode_workers,
                                "ray_cpus_per_worker": engine.ray_cpus_per_worker},
            "runs": runs, "ray_2_over_1_workers": ratio("clips_per_second"),
            "ray_2_over_1_workers_after_startup": ratio("clips_per_second_after_startup")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="frames", help="a key under extract: in params.yaml")
    parser.add_argument("--clips", type=int, default=80, help="the first N clips of the dataset (demo: 80)")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to run, comma separated")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--device", default="cpu", help="engine.device for every run (default cpu)")
    parser.add_argument("--out", default="reports/bench/scale.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    if args.store not in params.extract:
        parser.error(f"no store {args.store!r} under extract: in {args.params}")
    engine = replace(params.engine, device=args.device)
    workers = [int(w) for w in args.workers.split(",")]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        manifest = Path(tmp) / "manifest.jsonl"
        write_manifest(ingest(params.ingest)[:args.clips], manifest)
        report = bench(args.store, params.extract[args.store], engine, manifest, Path(tmp), workers)
    report["bench_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    write_json(out, report)
    print(f"{report['store']} ({report['extractor']}), {report['clips']} clips, {report['cpus']} cpus, "
          f"load average before/after {report['load_average_1m']}")
    for r in report["runs"]:
        label = "local" if r["engine"] == "local" else f"ray x{r['workers']}"
        after = (f", {r['clips_per_second_after_startup']:.2f} after {r['startup_seconds']:.1f}s of startup"
                 if r["startup_seconds"] else "")
        print(f"  {label:8} {r['clips_per_second']:6.2f} clips/s{after}  ({r['seconds']:.1f}s on {r['device']}, "
              f"model {r['model_seconds_summed']:.1f}s summed, write {r['write_ms_per_clip']:.1f} ms/clip, "
              f"max |diff| vs local {r['max_abs_diff_vs_local']:.2g})")
    print(f"  ray 2 workers / 1 worker: {report['ray_2_over_1_workers']}x "
          f"({report['ray_2_over_1_workers_after_startup']}x after startup)   -> {out}")


if __name__ == "__main__":
    main()
