"""DVC stage `extract@<store>`: manifest -> features/<store>.h5 with the extractor in params.

The spec is `extract.<store>` in params; `--section text_enriched` (or `llm_labels`) reads a
single-store section instead (the `text_enriched` stage runs the text extractor on the
enriched manifest, `llm_labels` the LLM zero-shot labeller). With `llm.enabled: false` a store
an LLM makes is written empty, and no model loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_params, store_spec
from pipeline.extract.engine import run_extraction, write_disabled
from pipeline.stages import entry_point


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mer extract", description=__doc__)
    parser.add_argument("store", help="store name, a key under `extract` in params")
    parser.add_argument("manifest", type=Path, nargs="?", default=Path("data/manifest.jsonl"))
    parser.add_argument("output", type=Path, nargs="?", help="default features/<store>.h5")
    parser.add_argument("summary", type=Path, nargs="?", help="default reports/extract/<store>.json")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--section", default="extract",
                        help="params section of the spec: 'extract' (a map of stores) or a single-store "
                             "section, text_enriched or llm_labels")
    parser.add_argument("--restart", action="store_true",
                        help="discard this store's finished and partial work first")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    spec = store_spec(params, args.store, args.section)
    output = args.output or Path("features") / f"{args.store}.h5"
    summary_path = args.summary or Path("reports/extract") / f"{args.store}.json"
    section = f"extract.{args.store}" if args.section == "extract" else args.section
    if not params.llm.enabled and args.store in params.llm_stores():
        write_disabled(args.store, spec, output, summary_path)
        print(f"{args.store}: llm.enabled is false, no model loaded; an empty store -> {output}")
        return
    summary = run_extraction(args.store, spec, params.engine, args.manifest, output, summary_path=summary_path,
                             restart=args.restart, progress=not args.no_progress, section=section)
    print(f"{args.store}: {summary.done} extracted, {summary.skipped} already done, "
          f"{summary.failed} failed, {summary.not_applicable} without {summary.store}'s modality"
          + (f" ({summary.no_track} whose media has no such track, listed in "
             f"{output.with_suffix('.failures.jsonl')})" if summary.no_track else "")
          + f" -> {output}")


if __name__ == "__main__":
    main()
