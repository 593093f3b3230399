"""`mer check` and the ingest stage's first step: the whole params.yaml, checked before any work.

Loading (`pipeline.config.load_params`) already rejects unknown keys, wrong types, values
outside their choices or ranges, and store names that no store makes. This adds what needs
the machine or the package: the dataset root exists, every extractor's options are valid
for that extractor, the LLM backend's options are valid for that backend, and a `cuda`
device is visible. Model weights are checked by each extractor when its stage starts
(hashing a 7B checkpoint here would make every check slow).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import CONSUMERS, SECTION_STORES, ConfigError, Params, load_params  # noqa: F401
from pipeline.devices import require_visible

INPUTS = Path("features/inputs")  # features/inputs/<consumer>/<store>.json: see prune_inputs


def check_store_names(params: Params) -> None:
    """Every store that train and refine read is one the params make (a typo fails here, not after extraction).
    A params file without `extract` makes no stores (its stores come from elsewhere): nothing to check against."""
    known = params.store_names()
    if not params.extract:
        return
    for store in SECTION_STORES:
        if store in params.extract:
            raise ConfigError(f"params key 'extract.{store}' is taken by the store of params section '{store}'; "
                              f"set its extractor in params key '{store}' or rename the store")
    for key in CONSUMERS:
        named, left_out = params.stores_read(key)
        unknown = [s for s in named + left_out if s not in known]
        if unknown:
            raise ConfigError(f"params key '{key}' names {', '.join(map(repr, unknown))}, which no store makes; "
                              f"allowed: {', '.join(known) or 'none'} (a key under 'extract', or "
                              f"{' / '.join(SECTION_STORES)} when that params section is set)")
    if not params.stores_read("train.stores")[0]:
        raise ConfigError("params key 'train.stores' names only LLM stores and 'llm.enabled' is false; "
                          "allowed: at least one store that needs no LLM, or llm.enabled: true")
    single = params.train.model.single
    if params.train.model.kind == "single" and single in params.stores_read("train.stores")[1]:
        raise ConfigError(f"params key 'train.model.single' is {single!r}, an LLM store, and 'llm.enabled' is "
                          "false; allowed: another store of train.stores, or llm.enabled: true")
    refine_stores, label_stores = params.stores_read("refine.stores")[0], params.stores_read("refine.label_stores")[0]
    if not (refine_stores or label_stores):
        raise ConfigError("params keys 'refine.stores' and 'refine.label_stores' name only LLM stores and "
                          "'llm.enabled' is false; allowed: a store that needs no LLM in refine.stores")


def prune_inputs(params: Params, root: Path = INPUTS) -> list[Path]:
    """Delete the digest files of stores a consumer no longer names; return them.

    `features/inputs/<consumer>/<store>.json` is written by the DVC stage `<consumer>_store@<store>`,
    one per store that `train.stores` (or `refine.stores`, `refine.label_stores`) names; the
    consumer stage depends on the folder, so the graph follows params alone (README "Stores are
    chosen in params"). A store dropped from a list leaves its file behind; removed here (this
    stage reruns whenever those params change, before the consumers), the folder holds exactly
    the named stores. The folders are created so a consumer that names no store still has one.
    """
    removed = []
    for key, folder in CONSUMERS.items():
        named, left_out = params.stores_read(key)
        path = root / folder
        path.mkdir(parents=True, exist_ok=True)
        for old in sorted(path.glob("*.json")):
            if old.stem not in named + left_out:
                old.unlink()
                removed.append(old)
    return removed


def check_params(params: Params) -> list[str]:
    """Raise ConfigError (one line: key, value, what is allowed) for the first problem; return what was checked."""
    from pipeline.extractors.base import build_extractor
    from pipeline.fusion.models import check_kind
    from pipeline.llm.backends import build_llm

    root = Path(params.ingest.root)
    if not root.is_dir():
        raise ConfigError(f"params key 'ingest.root' is {params.ingest.root!r}, which is not a folder; "
                          "allowed: a dataset root in the MER2025 layout (see README 'Your own dataset')")
    check_store_names(params)
    specs = {f"extract.{name}": spec for name, spec in params.extract.items()}
    specs.update({s: params.section_spec(s) for s in SECTION_STORES if params.section_spec(s) is not None})
    for key, spec in specs.items():
        build_extractor(spec.extractor, spec.options, key)
    try:
        build_llm(params.llm.backend, params.llm.backend_options, "llm.backend_options")
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"params key 'llm.backend_options': {err}") from None
    check_kind(params.train.model.kind)
    require_visible(params.engine.device, "engine.device")
    require_visible(params.train.device, "train.device")
    if params.engine.runner == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("params key 'engine.runner' is 'ray' but ray is not installed; "
                              "allowed: local, or pip install -e '.[ray]'")
    stores = params.store_names()
    return [f"ingest.root {root}", f"stores {', '.join(stores)}", f"llm backend {params.llm.backend}",
            f"engine.device {params.engine.device}", f"train.device {params.train.device}"]
