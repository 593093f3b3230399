"""The `mer` command: one subcommand per stage plus a few inspection helpers."""

from __future__ import annotations

import sys

USAGE = """usage: mer COMMAND [ARGS]

commands:
  ingest MANIFEST [SUMMARY]      read params `ingest.root` (MER2025 layout) into a manifest
                                 (--media FILE: also the clips without labels, what extract reads)
  extract STORE [MANIFEST ...]   fill features/STORE.h5 with the extractor in params `extract.STORE`
  convert ravdess|meld|folder SRC DST   turn a corpus or a folder into the MER2025 layout
  predict CLIP [CLIP ...]        emotion, probabilities and modality weights for new clips (--json)
  extractors                     list the registered extractors
  store-info PATH                show a feature store's attributes and contents
  check [--params FILE]          validate the whole params.yaml (keys, types, ranges, paths, device)
  build-demo [--shared DIR]      rebuild data/demo from ../shared/data

`mer COMMAND --help` shows a command's options."""


def _extractors(argv: list[str]) -> None:
    import argparse

    from pipeline.extractors import available, get_extractor

    argparse.ArgumentParser(prog="mer extractors", description="list the registered extractors").parse_args(argv)
    for name in available():
        cls = get_extractor(name)
        print(f"{name:24s} {cls.modality:6s} {(cls.__doc__ or '').strip().splitlines()[0]}")


def _convert(argv: list[str]) -> None:
    import argparse
    from pathlib import Path

    from pipeline.data import convert

    parser = argparse.ArgumentParser(prog="mer convert", description=convert.__doc__)
    sub = parser.add_subparsers(dest="corpus", required=True)
    for name, adapter in convert.ADAPTERS.items():
        corpus = sub.add_parser(name, help=adapter.help)
        adapter.add_options(corpus)
        corpus.add_argument("src", type=Path)
        corpus.add_argument("dst", type=Path)
    options = vars(parser.parse_args(argv))
    adapter = convert.ADAPTERS[options.pop("corpus")]
    args = argparse.Namespace(src=options.pop("src"), dst=options.pop("dst"))
    items, report = adapter.convert(args.src, **options)
    convert.write_layout(items, args.dst, report)
    print("\n".join(report.lines()) + f"\n-> {args.dst}")


def _predict(argv: list[str]) -> None:
    import argparse
    import json
    import logging
    from pathlib import Path

    from pipeline.config import load_params
    from pipeline.fusion.predict import format_text, run_predict

    parser = argparse.ArgumentParser(prog="mer predict", description="emotion of clips never ingested")
    parser.add_argument("clips", nargs="+", type=Path)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--text", default="", help="English subtitle (applies to every clip given)")
    parser.add_argument("--text-zh", default="", help="Chinese subtitle")
    parser.add_argument("--models", type=Path, default=Path("models/fusion"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--same-speaker", action="store_true",
                        help="the clips are one speaker's (needed by models trained with speaker normalisation)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = run_predict(args.clips, load_params(args.params), args.models, args.text, args.text_zh,
                          same_speaker=args.same_speaker)
    print(json.dumps(results, indent=2, ensure_ascii=False) if args.json else format_text(results))


def _store_info(argv: list[str]) -> None:
    import argparse
    import json

    from pipeline.store import StoreReader

    parser = argparse.ArgumentParser(prog="mer store-info", description="a feature store's attributes and contents")
    parser.add_argument("path", help="a store file, e.g. features/prosody.h5")
    args = parser.parse_args(argv)
    with StoreReader(args.path) as reader:
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in reader.attrs.items()
                 if k != "fingerprint_inputs_json"}
        print(json.dumps(attrs, indent=2, default=str))
        if reader.empty:
            print("clips: 0 (no clip had this store's modality: every reader treats it as missing)")
        else:
            print(f"clips: {len(reader.names)}; outputs: {', '.join(reader.keys)}")


def _stage(module: str):
    import importlib

    return importlib.import_module(module).main


COMMANDS = {
    "ingest": lambda: _stage("pipeline.stages.ingest"),
    "extract": lambda: _stage("pipeline.stages.extract"),
    "check": lambda: _stage("pipeline.stages.check"),
    "build-demo": lambda: _stage("pipeline.bench.demo"),
    "predict": lambda: _predict,
    "convert": lambda: _convert,
    "extractors": lambda: _extractors,
    "store-info": lambda: _store_info,
}


def main(argv: list[str] | None = None) -> None:
    """Dispatch; the one error boundary of the command: a `MerError` or a missing file is one line."""
    from pipeline.errors import MerError
    from pipeline.stages import user_message

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mer: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    try:
        COMMANDS[command]()(rest)
    except (MerError, FileNotFoundError) as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    main()
