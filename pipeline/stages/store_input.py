"""DVC stages `<consumer>_store@<store>`: one store a consumer names -> its digest file.

`train_store@prosody` reads features/prosody.h5 and writes features/inputs/train/prosody.json
(identity, clip count, sha256). dvc.yaml makes one such stage per store named in
`train.stores`, `refine.stores` and `refine.label_stores` (`foreach` over the params list), and
train, ablate and refine depend on the folder: the graph follows params alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.stages import entry_point
from pipeline.store import store_digest
from pipeline.tables import write_json


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.store_input", description=__doc__)
    parser.add_argument("store", type=Path, help="features/<store>.h5")
    parser.add_argument("output", type=Path, help="features/inputs/<consumer>/<store>.json")
    args = parser.parse_args(argv)
    write_json(args.output, store_digest(args.store))


if __name__ == "__main__":
    main()
