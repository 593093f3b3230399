"""DVC stage `enrich`: manifest + params `llm` -> enriched subtitles and the enriched manifest.

Writes `enriched` (one JSON line per clip and language: subtitle, enriched text, status),
`manifest_out` (the manifest with "subtitle\\n\\nenriched" in the subtitle fields, which
the `text_enriched` stage encodes with the ordinary text extractor) and a summary JSON.
The answers cache (`llm.cache_path`) is not a DVC output: it outlives `dvc repro` so an
unchanged or interrupted run asks the model nothing twice. With `llm.enabled: false` no model
loads: no subtitle is enriched and the summary says `enabled: false`.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from pipeline.config import LANGUAGES, load_params
from pipeline.llm.enrich import EnrichSummary, enrich_from_params, enriched_manifest, read_enriched
from pipeline.extract.engine import resolve_device
from pipeline.manifest import read_manifest, write_manifest
from pipeline.stages import entry_point
from pipeline.tables import write_json, write_jsonl


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.enrich", description=__doc__)
    parser.add_argument("manifest", type=Path, help="data/manifest.jsonl")
    parser.add_argument("enriched", type=Path, help="enriched subtitles to write (JSON lines)")
    parser.add_argument("manifest_out", type=Path, help="enriched manifest to write (JSON lines)")
    parser.add_argument("summary", type=Path, nargs="?", help="metrics JSON to write")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    clips = read_manifest(args.manifest)
    if not params.llm.enabled:
        write_jsonl(args.enriched, [{"name": c.name, "language": lang, "subtitle": getattr(c, lang), "enriched": "",
                                     "status": "llm_disabled"} for c in clips for lang in LANGUAGES[params.llm.language]])
        write_manifest(clips, args.manifest_out)
        if args.summary:
            write_json(args.summary, {"enabled": False, **{k: v for k, v in asdict(EnrichSummary()).items() if k != "seconds"}})
        print(f"llm.enabled is false: no subtitle enriched, no model loaded -> {args.enriched}")
        return
    summary = enrich_from_params(clips, params.llm, args.enriched, resolve_device(params.engine.device),
                                 progress=not args.no_progress)
    write_manifest(enriched_manifest(clips, read_enriched(args.enriched)), args.manifest_out)
    if args.summary:
        counts = {k: v for k, v in asdict(summary).items() if k != "seconds"}  # DVC metrics: counts, not timings
        write_json(args.summary, {"enabled": True, **counts})
    print(f"{summary.ok} subtitles enriched ({summary.cached} from the cache, {summary.asked} asked), "
          f"{summary.empty} empty, {summary.failed} failed in {summary.seconds:.1f}s -> {args.enriched}")


if __name__ == "__main__":
    main()
