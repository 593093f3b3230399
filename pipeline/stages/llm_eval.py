"""DVC stage `llm_eval`: the LLM zero-shot label store scored against gold -> reports/llm/metrics.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.llm.report import label_store_metrics
from pipeline.manifest import read_manifest
from pipeline.stages import entry_point
from pipeline.tables import write_json


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.llm_eval", description=__doc__)
    parser.add_argument("manifest", type=Path, help="data/manifest.jsonl")
    parser.add_argument("store", type=Path, help="features/llm_labels.h5")
    parser.add_argument("metrics", type=Path, help="metrics JSON to write")
    args = parser.parse_args(argv)
    if not args.store.is_file():
        raise FileNotFoundError(f"{args.store} not found; run `dvc repro {args.store.stem}` first")
    metrics = label_store_metrics(read_manifest(args.manifest), args.store)
    write_json(args.metrics, metrics, sort_keys=False)  # the headline scores first
    if metrics.get("enabled") is False:
        print(f"LLM labels: llm.enabled is false, nothing scored -> {args.metrics}")
        return
    failed = f" ({metrics['failed']} failed, not scored)" if metrics.get("failed") else ""
    print(f"LLM labels on {metrics['scored']} labelled clips{failed}: accuracy {metrics.get('accuracy', 'n/a')}, "
          f"weighted F1 {metrics.get('weighted_f1', 'n/a')} (majority class "
          f"{metrics.get('majority_class', {}).get('weighted_f1', 'n/a')}) -> {args.metrics}")


if __name__ == "__main__":
    main()
