"""DVC stage `refine`: manifest + feature stores (params `refine`) -> refined labels + summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.manifest import read_manifest
from pipeline.config import load_params, refine_config
from pipeline.refine.vote import refine, write_outputs
from pipeline.stages import entry_point


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.refine", description=__doc__)
    parser.add_argument("manifest", type=Path, help="data/manifest.jsonl")
    parser.add_argument("labels", type=Path, help="refined label table to write (JSON lines)")
    parser.add_argument("summary", type=Path, help="metrics JSON to write")
    parser.add_argument("--features", type=Path, default=Path("features"),
                        help="folder of the feature stores <store>.h5")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    cfg = refine_config(load_params(args.params))
    result = refine(read_manifest(args.manifest), cfg, args.features)
    summary = write_outputs(result, cfg, args.labels, args.summary)
    # train decides whether these are trained on (train.use_refined / use_pseudo, off by default)
    print(f"{summary['changed']} of {summary['labelled']} labels changed and {summary['dropped']} flagged "
          f"({cfg.method}, mode {cfg.mode}), {summary['pseudo']} of {summary['unlabelled']} unlabelled clips "
          f"pseudo-labelled -> {args.labels}; train reads them with train.use_refined / use_pseudo")


if __name__ == "__main__":
    main()
