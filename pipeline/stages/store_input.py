"""DVC stages `<consumer>_store@<store>`: one store a consumer names -> its digest file.

`train_store@prosody` reads features/prosody.h5 and writes features/inputs/train/prosody.json
(identity, clip count, sha256). dvc.yaml makes one such stage per store named in
`train.stores`, `refine.stores` and `refine.label_stores` (`foreach` over the params list), and
train, ablate and refine depend on the folder: the graph follows params alone.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from pipeline.stages import entry_point
from pipeline.store import StoreReader
from pipeline.tables import write_json


def store_digest(path: str | Path) -> dict[str, Any]:
    """What a consumer reads from a store, in a few lines: its identity, clip count and a content hash.

    Written by the `<consumer>_store@<store>` DVC stages (pipeline/stages/store_input.py): a
    consumer depends on the folder of these files, so it reruns exactly when a store it names
    changes, whatever params say it names.
    """
    path = Path(path)
    with path.open("rb") as fh:
        sha = hashlib.file_digest(fh, "sha256")
    with StoreReader(path) as reader:
        attrs, clips = reader.attrs, len(reader.names)
    return {"store": str(attrs.get("store", path.stem)), "extractor": str(attrs.get("extractor", "")),
            "fingerprint": str(attrs.get("fingerprint", "")), "clips": clips,
            "bytes": path.stat().st_size, "sha256": sha.hexdigest()}


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.store_input", description=__doc__)
    parser.add_argument("store", type=Path, help="features/<store>.h5")
    parser.add_argument("output", type=Path, help="features/inputs/<consumer>/<store>.json")
    args = parser.parse_args(argv)
    write_json(args.output, store_digest(args.store))


if __name__ == "__main__":
    main()
