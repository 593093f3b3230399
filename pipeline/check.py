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

from pipeline.config import ENRICHED_STORE, ConfigError, Params, load_params  # noqa: F401
from pipeline.devices import require_visible


def check_store_names(params: Params) -> None:
    """Every store that train and refine read is one the params make (a typo fails here, not after extraction).
    A params file without `extract` makes no stores (its stores come from elsewhere): nothing to check against."""
    known = params.store_names()
    if not params.extract:
        return
    if ENRICHED_STORE in params.extract:
        raise ConfigError(f"params key 'extract.{ENRICHED_STORE}' is taken by the enrichment store; "
                          "set its extractor in params key 'text_enriched' or rename the store")
    for key, stores in (("train.stores", params.train.stores), ("refine.stores", params.refine.stores),
                        ("refine.label_stores", params.refine.label_stores)):
        unknown = [s for s in stores if s not in known]
        if unknown:
            raise ConfigError(f"params key '{key}' names {', '.join(map(repr, unknown))}, which no store makes; "
                              f"allowed: {', '.join(known) or 'none'} (a key under 'extract', or "
                              f"{ENRICHED_STORE} when params 'text_enriched' is set)")


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
    if params.text_enriched is not None:
        specs["text_enriched"] = params.text_enriched
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
