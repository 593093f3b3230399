"""The whisper store three ways on the same clips, in one process: which layers cost what.

    python -m pipeline.bench.whisper --manifest data/manifest.jsonl --limit 24

(a) the encoder's last output through CTranslate2 int8 (`layers: []`, the earlier default),
(b) blocks 2-5 in PyTorch, each window at its own length (the default), (c) the same blocks
with each window zero-padded to 30 s (`pad_to_30s: true`). Each run is the real engine
(`run_extraction`) with its own model load; the ratios use the model seconds after the load,
against run (a) in the same process, so machine noise between processes does not enter. The other options are
params' `extract.whisper`. Writes `reports/bench/whisper.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import ExtractorSpec, load_params
from pipeline.extract.engine import resolve_device, run_extraction
from pipeline.manifest import read_manifest, write_manifest
from pipeline.tables import write_json

VARIANTS = {"ctranslate2 last output (layers: [])": {"layers": []},
            "pytorch blocks 2-5, own length (default)": {"layers": [2, 3, 4, 5], "pad_to_30s": False},
            "pytorch blocks 2-5, padded to 30 s": {"layers": [2, 3, 4, 5], "pad_to_30s": True}}


def bench(spec: ExtractorSpec, engine: Any, manifest: Path, limit: int) -> dict[str, Any]:
    clips = [c for c in read_manifest(manifest) if c.has_audio][:limit]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_whisper_") as tmp:
        write_manifest(clips, Path(tmp) / "manifest.jsonl")
        for i, (name, options) in enumerate(VARIANTS.items()):
            variant = ExtractorSpec(spec.extractor, {**spec.options, **options})
            summary = run_extraction("whisper", variant, engine, Path(tmp) / "manifest.jsonl",
                                     Path(tmp) / f"whisper{i}.h5", progress=False)
            rows.append({"variant": name, "options": options, "clips": summary.done, "failed": summary.failed,
                         "load_seconds": round(summary.load_seconds, 2),
                         "s_per_clip_after_load": round((summary.seconds - summary.load_seconds) / max(1, summary.done), 4),
                         "model_s_per_clip": round(summary.model_seconds / max(1, summary.done), 4)})
    base = rows[0]["s_per_clip_after_load"]
    for row in rows:
        row["speed_vs_ctranslate2"] = round(base / row["s_per_clip_after_load"], 2) if row["s_per_clip_after_load"] else None
    return {"clips": len(clips), "device": engine.device, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.whisper", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=Path("data/manifest.jsonl"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("reports/bench/whisper.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    engine = dataclasses.replace(params.engine, device=resolve_device(params.engine.device))
    report = bench(params.extract["whisper"], engine, args.manifest, args.limit)
    write_json(args.out, report)
    for row in report["rows"]:
        print(f"{row['variant']:44s} {row['s_per_clip_after_load']:.3f} s/clip after a {row['load_seconds']:.1f} s load,"
              f" {row['speed_vs_ctranslate2']}x the CTranslate2 rate")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
