"""DVC stage `ablate`: the training protocol per modality subset and per fusion kind."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_params, train_config
from pipeline.manifest import read_manifest
from pipeline.stages import entry_point
from pipeline.stages.train import fold_refiner, read_refined
from pipeline.tables import write_table


@entry_point
def main(argv: list[str] | None = None) -> None:
    from pipeline.fusion.ablation import run_ablation, to_markdown
    from pipeline.fusion.features import voice_store
    from pipeline.fusion.train import load_features

    parser = argparse.ArgumentParser(prog="mer ablate", description=__doc__)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path, help="table path without suffix (.json and .md are written)")
    parser.add_argument("--refined", type=Path)
    parser.add_argument("--features", type=Path, default=Path("features"))
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = train_config(params)
    clips = read_manifest(args.manifest)
    refined, pseudo = read_refined(args.refined)
    features = load_features(clips, cfg.stores, args.features, speaker_norm=cfg.speaker_norm,
                             voices=voice_store(cfg.speaker_stores, args.features))
    rows = run_ablation(clips, features, cfg, refined, pseudo,
                        fold_refiner(clips, params, args.features))
    write_table(args.out, rows, to_markdown(rows))


if __name__ == "__main__":
    main()
