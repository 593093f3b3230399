"""The `mer` command: one subcommand per stage plus a few inspection helpers."""

from __future__ import annotations

import sys

USAGE = """usage: mer COMMAND [ARGS]

commands:
  ingest MANIFEST [SUMMARY]      read params `ingest.root` (MER2025 layout) into a manifest
  extract STORE [MANIFEST ...]   fill features/STORE.h5 with the extractor in params `extract.STORE`
  extractors                     list the registered extractors
  store-info PATH                show a feature store's attributes and contents
  build-demo [--shared DIR]      rebuild data/demo from ../shared/data

`mer COMMAND --help` shows a command's options."""


def _extractors(argv: list[str]) -> None:
    from pipeline.extractors import available, get_extractor

    for name in available():
        cls = get_extractor(name)
        print(f"{name:24s} {cls.modality:6s} {(cls.__doc__ or '').strip().splitlines()[0]}")


def _store_info(argv: list[str]) -> None:
    import json

    from pipeline.store import StoreReader

    with StoreReader(argv[0]) as reader:
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in reader.attrs.items()
                 if k != "fingerprint_inputs_json"}
        print(json.dumps(attrs, indent=2, default=str))
        print(f"clips: {len(reader.names)}; outputs: {', '.join(reader.keys)}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "ingest":
        from pipeline.stages.ingest import main as run
    elif command == "extract":
        from pipeline.stages.extract import main as run
    elif command == "build-demo":
        from pipeline.demo import main as run
    elif command == "extractors":
        run = _extractors
    elif command == "store-info":
        run = _store_info
    else:
        print(f"mer: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    run(rest)


if __name__ == "__main__":
    main()
