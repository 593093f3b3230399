"""Page weight of the error browser on a synthetic set: `make bench-browser` (10,000 clips).

The rows go through the stage's own `clip_row`, so the page holds exactly what a real run
would write; subtitles are drawn from lengths typical of MER2025 (zh 8-40 characters, en
30-160), one clip in five lacks a modality and one in fifty has a failure record. Thumbnails
are not drawn: their weight is counted from the demo's (`--thumbs`), since the page loads only
those of the 50 cards on screen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pipeline.browser.page import write_page
from pipeline.browser.records import clip_row
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip
from pipeline.stages import entry_point

STORES = ["frames", "faces", "prosody", "whisper", "text"]
ZH = "我们在门边说话孩子狗坐今天天气很好真的吗不可能太好了"
EN = "the kids are talking by the door and dogs are sitting it is really nice today "


def synthetic_rows(count: int, seed: int = 0, stores: list[str] = STORES) -> list[list]:
    """`count` browser rows, about 3/4 labelled, 1/4 unlabelled candidates."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        labelled = rng.random() < 0.75
        probs = rng.dirichlet(np.full(len(EMOTIONS), 0.6))
        present = [rng.random() > 0.05 for _ in stores]
        weights = rng.dirichlet(np.ones(len(stores))) * np.array(present)
        weights = weights / max(weights.sum(), 1e-9)
        clip = Clip(name=f"clip_{i:06d}", video=f"video/clip_{i:06d}.mp4",
                    chinese="".join(rng.choice(list(ZH), rng.integers(8, 41))),
                    english=EN[: rng.integers(30, 160)].strip(),
                    label=str(rng.choice(EMOTIONS)) if labelled else None,
                    split="labelled" if labelled else "unlabelled", candidate=not labelled)
        proba = {"kind": "labelled_oof" if labelled else "unlabelled", "candidate": "0" if labelled else "1",
                 **{e: f"{p:.5f}" for e, p in zip(EMOTIONS, probs)}}
        cells = {s: (f"{w:.4f}" if has else "") for s, w, has in zip(stores, weights, present)}
        failures = [["extract.faces", "unreadable_media", "moov atom not found"]] if i % 50 == 0 else []
        rows.append(clip_row(clip, proba, cells, stores, None, failures, f"thumbs/{i:016x}.jpg"))
    return rows


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.browser", description=__doc__)
    parser.add_argument("--clips", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("build/browser-10k/index.html"))
    parser.add_argument("--thumbs", type=Path, default=Path("reports/browser/thumbs"),
                        help="a thumbnail folder whose mean JPEG size is used for the estimate")
    args = parser.parse_args(argv)
    size = write_page(args.out, STORES, synthetic_rows(args.clips))
    jpegs = [p.stat().st_size for p in args.thumbs.glob("*.jpg")]
    mean_jpeg = float(np.mean(jpegs)) if jpegs else 0.0
    summary = {"clips": args.clips, "page_bytes": size, "page_bytes_per_clip": round(size / args.clips, 1),
               "mean_thumbnail_bytes": round(mean_jpeg), "thumbnails_bytes_all": round(mean_jpeg * args.clips),
               "thumbnails_bytes_per_page_of_50": round(mean_jpeg * 50)}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
