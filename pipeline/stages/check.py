"""DVC stage `check` and `mer check`: the whole params.yaml validated before any work.

Runs first in `dvc repro` (ingest depends on its output), so a typo anywhere in params, a
missing dataset root or `cuda` on a machine without one stops the pipeline with one line
naming the key, before DVC touches any output. The output records the dataset root and
the stores (what ingest and the store digests depend on), so a passing check reruns nothing
downstream, and a change of devices or LLM settings reruns only the stages that read them. As a stage
(an output path given) it also removes the input digests of stores no consumer names any
more (pipeline.check.prune_inputs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.stages import entry_point
from pipeline.tables import write_json


@entry_point
def main(argv: list[str] | None = None) -> None:
    from pipeline.check import INPUTS, check_params, prune_inputs
    from pipeline.config import load_params

    parser = argparse.ArgumentParser(prog="mer check", description=__doc__)
    parser.add_argument("output", type=Path, nargs="?", help="JSON record of what was checked (DVC stage output)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    checked = check_params(params)
    if args.output:
        # the project is where its params file is: checking another project's params prunes that project's
        for path in prune_inputs(params, Path(args.params).parent / INPUTS):
            print(f"{path}: removed (its store is no longer named in params)")
        # Only what ingest and the store digests need (they depend on this file): a change of device or LLM
        # settings must not rerun them; the stages that read those settings have them as params deps.
        write_json(args.output, {"params": args.params, "checked": checked[:2]})
    print(f"{args.params}: ok ({'; '.join(checked)})")


if __name__ == "__main__":
    main()
