"""DVC stage `check` and `mer check`: the whole params.yaml validated before any work.

Runs first in `dvc repro` (ingest depends on its output), so a typo anywhere in params, a
missing dataset root or `cuda` on a machine without one stops the pipeline with one line
naming the key, before DVC touches any output. The output lists what was checked and is
the same for the same params, so a passing check reruns nothing downstream.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.stages import entry_point


@entry_point
def main(argv: list[str] | None = None) -> None:
    from pipeline.check import check_params
    from pipeline.config import load_params

    parser = argparse.ArgumentParser(prog="mer check", description=__doc__)
    parser.add_argument("output", type=Path, nargs="?", help="JSON record of what was checked (DVC stage output)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    checked = check_params(load_params(args.params))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"params": args.params, "checked": checked}, indent=2) + "\n",
                               encoding="utf-8")
    print(f"{args.params}: ok ({'; '.join(checked)})")


if __name__ == "__main__":
    main()
