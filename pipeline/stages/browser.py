"""DVC stage `browser`: train's per-clip outputs -> reports/browser/index.html, the error browser.

One static page: open it in any browser (no server, no network). See README "Plots and the
error browser".
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--metrics", type=Path, help="train's metrics.json: whether it trained on the refined labels")
    args = parser.parse_args(argv)
    clips = read_manifest(args.manifest)
    thumbs = existing_thumbs(clips, args.thumbs, args.page.parent)
    stores, rows = clip_rows(clips, args.proba, args.weights, args.refined, args.features, thumbs)
    size = write_page(args.page, stores, rows, refine_use=refine_use(args.metrics))
    print(f"{len(rows)} clips, {len(thumbs)} thumbnails, page {size / 1024:.0f} KiB -> {args.page}")


def refine_use(metrics: Path | None) -> str:
    """What train did with refine's labels, for the page's wording: "trained" (train.use_refined, one
    refinement on every label), "in_folds" (each training fold refined again without its scored
    clips, so its changes differ from the file's), "unused" (gold labels trained; the default),
    "unknown" without `--metrics`."""
    if metrics is None:  # not told: the cards say what refine did, not whether training followed
        return "unknown"
    try:
        values = json.loads(metrics.read_text(encoding="utf-8"))
        refined, in_folds = values["refined_labels"], values["refined_in_folds"]
    except (OSError, ValueError, KeyError) as err:
        raise FileNotFoundError(f"{metrics}: no refined_labels / refined_in_folds ({err}); run `dvc repro train`") from err
    return "unused" if not refined else "in_folds" if in_folds else "trained"


if __name__ == "__main__":
    main()
