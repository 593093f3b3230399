"""Throughput of one extraction store: the real engine against a naive loop, same clips.

    python -m pipeline.bench.extract --manifest data/manifest.jsonl --store frames --limit 32

(a) `pipeline.extract.engine.run_extraction` into a temporary folder (decode threads, batches
across clips, store writes); (b) in the same process, a naive loop: one clip at a time,
decoded then encoded one frame per model call (`per_frame`: a frame stack, or the faces
extractor's per-frame crops; whole clips otherwise), every model in PyTorch: the loop
people write first. Where the engine runs a model in onnxruntime (`runtime: auto` on the
CPU), (c) the naive loop once more on the engine's runtime tells the runtime's share of
the gain apart from batching and background decoding. All count one model load.
Writes `reports/bench/extract_<store>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.tables import write_json
from pipeline.data import media
from pipeline.config import EngineConfig, ExtractorSpec, load_params
from pipeline.extract.engine import decoder_threads, resolve_device, run_extraction
from pipeline.extractors.base import Extractor, NotApplicable, get_extractor
from pipeline.manifest import Clip, read_manifest, write_manifest

log = logging.getLogger(__name__)


@dataclass
class NaiveTimes:
    clips: int = 0
    load: float = 0.0
    prepare: float = 0.0  # decoding + the extractor's CPU preprocessing
    decode: float = 0.0  # the media-decoding part of `prepare`
    model: float = 0.0

    @property
    def seconds(self) -> float:
        return self.load + self.prepare + self.model


def per_frame(item: Any) -> list[Any]:
    """A prepared clip cut into one-frame items: a (T, ...) frame stack, or a dataclass whose
    4-D arrays share their first dimension T (the faces extractor's crops); else the item whole."""
    if isinstance(item, np.ndarray) and item.ndim == 4:
        return [item[i: i + 1] for i in range(len(item))]
    if dataclasses.is_dataclass(item):
        stacks = {f.name: v for f in dataclasses.fields(item)
                  if isinstance(v := getattr(item, f.name), np.ndarray) and v.ndim == 4}
        lengths = {len(v) for v in stacks.values()}
        if len(lengths) == 1 and (n := lengths.pop()) > 1:
            return [dataclasses.replace(item, **{k: v[i: i + 1] for k, v in stacks.items()}) for i in range(n)]
    return [item]


def _naive_one(extractor: Extractor, clip: Clip, times: NaiveTimes) -> None:
    """Decode one clip, then run the model on it one frame per call."""
    start, decoded = time.perf_counter(), media.decode_seconds()
    try:
        item = extractor.prepare(clip)
    except NotApplicable:
        return
    mid = time.perf_counter()
    for frame in per_frame(item):
        extractor.extract_batch([frame])
    times.clips += 1
    times.prepare += mid - start
    times.decode += media.decode_seconds() - decoded
    times.model += time.perf_counter() - mid


def pytorch_spec(spec: ExtractorSpec) -> ExtractorSpec:
    """`spec` with every model that offers a `runtime` choice run in PyTorch (the naive loop's)."""
    from pipeline.backends.image import ENCODERS

    defaults = {f.name: f.default for f in dataclasses.fields(get_extractor(spec.extractor).Options)}
    options = dict(spec.options)
    if "expression_runtime" in defaults:
        options["expression_runtime"] = "torch"
    if "encoder_options" in defaults:
        encoder = ENCODERS.get(options.get("encoder", defaults.get("encoder")))
        if encoder and "runtime" in {f.name for f in dataclasses.fields(encoder.Options)}:
            options["encoder_options"] = {**options.get("encoder_options", {}), "runtime": "torch"}
    return ExtractorSpec(spec.extractor, options)


def naive_loop(spec: ExtractorSpec, device: str, clips: list[Clip]) -> NaiveTimes:
    """The loop people write first; the first clip runs once untimed, to warm the model up."""
    extractor = get_extractor(spec.extractor)(spec.options)
    times = NaiveTimes()
    start = time.perf_counter()
    extractor.load(device)
    times.load = time.perf_counter() - start
    _naive_one(extractor, clips[0], NaiveTimes())
    for clip in clips:
        _naive_one(extractor, clip, times)
    return times


def _per_clip(seconds: float, clips: int) -> float:
    return round(seconds / clips, 4) if clips else 0.0


def bench(store: str, spec: ExtractorSpec, engine: EngineConfig, manifest: str | Path,
          limit: int | None = None) -> dict[str, Any]:
    """Run engine and naive loop on the first `limit` clips of `manifest`; return the report."""
    import torch

    clips = read_manifest(manifest)[:limit]
    device = resolve_device(engine.device)
    load_before = os.getloadavg()[0]  # other work on the machine skews both timings
    naive_spec = pytorch_spec(spec)
    naive = naive_loop(naive_spec, device, clips)  # also warms caches and torch for the engine
    # the same naive loop on the engine's runtime, when that differs from PyTorch
    same_runtime = naive_loop(spec, device, clips) if naive_spec != spec else naive
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        write_manifest(clips, Path(tmp) / "manifest.jsonl")
        summary = run_extraction(store, spec, engine, Path(tmp) / "manifest.jsonl",
                                 Path(tmp) / f"{store}.h5", progress=False)
    done = summary.done
    engine_cps = summary.clips_per_second
    naive_cps = naive.clips / naive.seconds if naive.seconds else 0.0
    # Without the one model load: what a long run sees (a big checkpoint's cold load can
    # outweigh a few dozen clips, and only the first of the two loads is cold).
    engine_steady = done / (summary.seconds - summary.load_seconds) if summary.seconds > summary.load_seconds else 0.0
    naive_steady = naive.clips / (naive.prepare + naive.model) if naive.prepare + naive.model else 0.0
    same_runtime_cps = same_runtime.clips / same_runtime.seconds if same_runtime.seconds else 0.0
    return {
        "store": store, "extractor": spec.extractor, "options": spec.options,
        "clips": len(clips), "device": device, "cpus": os.cpu_count(),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "engine_settings": {"batch_size": engine.batch_size, "decode_workers": engine.decode_workers,
                            "decoder_threads": decoder_threads(engine)},
        "engine": {
            "clips_per_second": round(engine_cps, 3), "seconds": round(summary.seconds, 3),
            "load_seconds": round(summary.load_seconds, 3),
            "clips_per_second_after_load": round(engine_steady, 3),
            "done": done, "failed": summary.failed, "not_applicable": summary.not_applicable,
            "prepare_s_per_clip": _per_clip(summary.prepare_seconds, done),
            "decode_s_per_clip": _per_clip(summary.decode_seconds, done),
            "model_s_per_clip": _per_clip(summary.model_seconds, done),
            "write_s_per_clip": _per_clip(summary.write_seconds, done),
            # media decoding (PyAV) summed over the decode threads, over wall time; the
            # extractor's other CPU preparation (face detection, resizing) is prepare - decode
            "decode_share_of_wall": round(summary.decode_seconds / summary.seconds, 3),
            "prepare_share_of_wall": round(summary.prepare_seconds / summary.seconds, 3),
        },
        "naive": {**_naive_report(naive), "options": naive_spec.options},
        "naive_engine_runtime": _naive_report(same_runtime) if same_runtime is not naive else None,
        "engine_over_naive": round(engine_cps / naive_cps, 2) if naive_cps else None,
        "engine_over_naive_after_load": round(engine_steady / naive_steady, 2) if naive_steady else None,
        # batching and background decoding alone: both on the engine's runtime
        "engine_over_naive_engine_runtime": round(engine_cps / same_runtime_cps, 2) if same_runtime_cps else None,
    }


def _naive_report(times: NaiveTimes) -> dict[str, Any]:
    steady = times.clips / (times.prepare + times.model) if times.prepare + times.model else 0.0
    return {
        "clips_per_second": round(times.clips / times.seconds, 3) if times.seconds else 0.0,
        "seconds": round(times.seconds, 3), "load_seconds": round(times.load, 3),
        "clips_per_second_after_load": round(steady, 3),
        "prepare_s_per_clip": _per_clip(times.prepare, times.clips),
        "decode_s_per_clip": _per_clip(times.decode, times.clips),
        "model_s_per_clip": _per_clip(times.model, times.clips),
    }


def _print(report: dict[str, Any]) -> None:
    e, n = report["engine"], report["naive"]
    print(f"{report['store']} ({report['extractor']}), {report['clips']} clips on {report['device']}, "
          f"{report['cpus']} cpus, torch threads {report['torch_threads']}, "
          f"load average before/after {report['load_average_1m']}")
    print(f"  engine: {e['clips_per_second']:.2f} clips/s; per clip (threads) prepare {e['prepare_s_per_clip']:.3f}s "
          f"of which decode {e['decode_s_per_clip']:.3f}s, model {e['model_s_per_clip']:.3f}s, "
          f"write {e['write_s_per_clip']:.4f}s; decode / wall {e['decode_share_of_wall']:.0%}, "
          f"prepare / wall {e['prepare_share_of_wall']:.0%}")
    print(f"  naive:  {n['clips_per_second']:.2f} clips/s; per clip prepare {n['prepare_s_per_clip']:.3f}s "
          f"of which decode {n['decode_s_per_clip']:.3f}s, model {n['model_s_per_clip']:.3f}s")
    if same := report["naive_engine_runtime"]:
        print(f"  naive on the engine's runtime: {same['clips_per_second']:.2f} clips/s; per clip prepare "
              f"{same['prepare_s_per_clip']:.3f}s, model {same['model_s_per_clip']:.3f}s")
    print(f"  engine / naive: {report['engine_over_naive']}x with one model load each, "
          f"{report['engine_over_naive_after_load']}x after it (loads: engine {e['load_seconds']:.2f}s, "
          f"naive {n['load_seconds']:.2f}s)"
          + (f"; over the naive loop on the engine's runtime: {report['engine_over_naive_engine_runtime']}x"
             if same else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default="data/manifest.jsonl")
    parser.add_argument("--store", required=True, help="a key under extract: in params.yaml")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--limit", type=int, default=32, help="clips to run (first N of the manifest)")
    parser.add_argument("--out", default="reports/bench", help="folder for extract_<store>.json")
    parser.add_argument("--extractor", help="bench this extractor instead of params' extract.<store>")
    parser.add_argument("--options", default="{}", help="JSON options for --extractor")
    parser.add_argument("--device", help="override params engine.device (auto | cpu | cuda)")
    parser.add_argument("--batch-size", type=int, help="override params engine.batch_size (clips per model call)")
    parser.add_argument("--decode-workers", type=int, help="override params engine.decode_workers")
    parser.add_argument("--decoder-threads", type=int, help="override params engine.decoder_threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    if args.extractor:
        spec = ExtractorSpec(args.extractor, json.loads(args.options))
    elif args.store in params.extract:
        spec = params.extract[args.store]
    else:
        parser.error(f"no store {args.store!r} under extract: in {args.params} "
                     f"(known: {', '.join(sorted(params.extract))}); or pass --extractor")
    overrides = {"device": args.device, "batch_size": args.batch_size, "decode_workers": args.decode_workers,
                 "decoder_threads": args.decoder_threads}
    engine = dataclasses.replace(params.engine, **{k: v for k, v in overrides.items() if v is not None})
    report = bench(args.store, spec, engine, args.manifest, args.limit)
    out = Path(args.out) / f"extract_{args.store}.json"
    write_json(out, report)
    _print(report)
    print(f"  written {out}")


if __name__ == "__main__":
    main()
