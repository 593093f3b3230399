"""DVC stage `ingest`: dataset root (params `ingest.root`) -> manifest + summary metrics, and the
label-free media manifest the extract stages read (`--media`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_params
from pipeline.data.ingest import has_content, ingest, summarize
from pipeline.manifest import media_only, write_manifest
from pipeline.stages import entry_point
from pipeline.tables import write_json


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mer ingest", description=__doc__)
    parser.add_argument("manifest", type=Path, help="manifest to write (JSON lines)")
    parser.add_argument("summary", type=Path, nargs="?", help="metrics JSON to write")
    parser.add_argument("--media", type=Path, help="the same clips without labels, groups or splits (JSON lines)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    clips = ingest(load_params(args.params).ingest)  # typed and range-checked; `mer check` does the rest
    write_manifest(clips, args.manifest)
    if args.media:
        # a clip with no media and no subtitle (kept in the manifest for its label or candidacy) has
        # nothing to extract: leaving it out keeps a new labels or candidates file from rerunning extraction
        write_manifest([media_only(c) for c in clips if has_content(c)], args.media)
    summary = summarize(clips)
    if args.summary:
        write_json(args.summary, summary)
    note = (f"; {summary['candidates_without_content']} candidate(s) have no media and an empty subtitle "
            "(they get the training prior)" if summary["candidates_without_content"] else "")
    print(f"{len(clips)} clips ({summary['labelled']} labelled, {summary['candidates']} candidates){note} "
          f"-> {args.manifest}")


if __name__ == "__main__":
    main()
