"""DVC stage `browser`: train's per-clip outputs -> reports/browser/index.html, the error browser.

One static page: open it in any browser (no server, no network). See README "Plots and the
error browser".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.manifest import read_manifest
from pipeline.stages import entry_point


@entry_point
def main(argv: list[str] | None = None) -> None:
    from pipeline.browser.page import write_page
    from pipeline.browser.records import clip_rows, existing_thumbs

    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.browser", description=__doc__)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("page", type=Path, help="the page to write (reports/browser/index.html)")
    parser.add_argument("--proba", type=Path, required=True, help="train's predictions_proba.csv")
    parser.add_argument("--weights", type=Path, required=True, help="train's clip_weights.csv")
    parser.add_argument("--refined", type=Path, help="refine's labels.jsonl")
    parser.add_argument("--thumbs", type=Path, required=True, help="the thumbs stage's folder")
    parser.add_argument("--features", type=Path, default=Path("features"), help="folder of <store>.failures.jsonl")
    args = parser.parse_args(argv)
    clips = read_manifest(args.manifest)
    thumbs = existing_thumbs(clips, args.thumbs, args.page.parent)
    stores, rows = clip_rows(clips, args.proba, args.weights, args.refined, args.features, thumbs)
    size = write_page(args.page, stores, rows)
    print(f"{len(rows)} clips, {len(thumbs)} thumbnails, page {size / 1024:.0f} KiB -> {args.page}")


if __name__ == "__main__":
    main()
