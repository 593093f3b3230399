"""DVC stage `thumbs`: manifest -> one middle-frame JPEG per clip with video, for the error browser.

Its own stage, apart from `browser`, so retraining rewrites the page without decoding every
clip again: thumbnails depend on the media alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.manifest import read_manifest
from pipeline.stages import entry_point


@entry_point
def main(argv: list[str] | None = None) -> None:
    from pipeline.browser.thumbs import write_thumbnails

    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.thumbs", description=__doc__)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("folder", type=Path, help="folder for the JPEGs (reports/browser/thumbs)")
    args = parser.parse_args(argv)
    counts = write_thumbnails(read_manifest(args.manifest), args.folder)
    print(f"{counts['written']} thumbnails, {counts['no_video']} clips without video, "
          f"{counts['undecodable']} undecodable -> {args.folder}")


if __name__ == "__main__":
    main()
