"""The extractor interface and its registry.

An extractor turns one clip into named arrays. `__init__` only stores settings;
`load(device)` builds the model and imports heavy libraries, so listing or testing
extractors never imports a model library it does not need. `prepare` decodes media and
runs in background threads; `extract_batch` runs the model on a batch of prepared clips.
"""

from __future__ import annotations

import importlib.metadata
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import numpy as np

from pipeline.config import ConfigError, from_dict
from pipeline.errors import MerError, ModelMissing  # noqa: F401 - ModelMissing re-exported
from pipeline.manifest import Clip


class UnknownExtractor(MerError, KeyError):
    """`extract.<store>.extractor` names no registered extractor."""


class NotApplicable(Exception):
    """The clip lacks this extractor's modality (e.g. a text-only clip for audio): not a failure."""


class Extractor(ABC):
    name: ClassVar[str]
    modality: ClassVar[str]  # video | face | audio | text
    Options: ClassVar[type]  # dataclass of the extractor's own params (`extract.<store>.options`)
    output_keys: ClassVar[tuple[str, ...]]  # what every clip gets; resume checks these
    sequence_keys: ClassVar[tuple[str, ...]] = ()  # outputs whose first dim varies per clip
    packages: ClassVar[tuple[str, ...]] = ("numpy",)  # libraries whose version changes values

    def __init__(self, options: dict[str, Any] | None = None, where: str = "extract.<store>.options"):
        """`where`: the params key of `options` (`extract.frames.options`), named in every error."""
        self.where = where
        self.options = from_dict(self.Options, options or {}, where)
        self.device = "cpu"

    def load(self, device: str = "cpu") -> None:
        """Build the model on `device`; a no-op for model-free extractors."""
        self.device = device

    def model_identity(self) -> dict[str, Any]:
        """What identifies the weights (path, file hash, model name); part of the fingerprint.

        Must raise `ModelMissing` when the weights are not on disk; it is called before
        any clip is touched. Must not load the model (that is `load`'s job).
        """
        return {}

    def versions(self) -> dict[str, str]:
        return {pkg: importlib.metadata.version(pkg) for pkg in self.packages}

    def plan(self, todo: list[Clip]) -> str | None:
        """A line saying what this run will cost, logged after `load` and before any clip; None: nothing to say."""
        return None

    def counts(self) -> dict[str, int]:
        """What this run did, beyond clips (e.g. prompts asked vs answered from a cache): into the summary JSON."""
        return {}

    @abstractmethod
    def prepare(self, clip: Clip) -> Any:
        """Decode what the model needs; raise NotApplicable or pipeline.data.media.MediaError."""

    @abstractmethod
    def extract_batch(self, items: list[Any]) -> list[dict[str, np.ndarray]]:
        """Run the model on prepared items; one dict of `output_keys` per item."""


REGISTRY: dict[str, type[Extractor]] = {}


def register(name: str) -> Callable[[type[Extractor]], type[Extractor]]:
    def wrap(cls: type[Extractor]) -> type[Extractor]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"extractor name {name!r} registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return wrap


def get_extractor(name: str) -> type[Extractor]:
    _load_builtin()
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownExtractor(
            f"unknown extractor {name!r}; known: {', '.join(sorted(REGISTRY))}"
        ) from None


def build_extractor(spec_extractor: str, options: dict[str, Any], section: str) -> Extractor:
    """The extractor `spec_extractor` with `options` checked; `section` is the store's params key
    (`extract.frames`), named in every error. Nothing loads."""
    try:
        cls = get_extractor(spec_extractor)
    except UnknownExtractor as err:
        raise UnknownExtractor(f"params key '{section}.extractor': {err.message()}") from None
    where = f"{section}.options"
    try:
        return cls(options, where)
    except (ConfigError, ValueError, TypeError) as err:  # an Options check may not know its key: add it
        message = str(err)
        raise ConfigError(message if where in message else f"params key '{where}': {message}") from None


def available() -> list[str]:
    _load_builtin()
    return sorted(REGISTRY)


def _load_builtin() -> None:
    """Import every module of this package: the decorators fill the registry.

    Modules import only light libraries at top level; heavy ones load in `load()`.
    """
    import importlib
    import pkgutil
    from pathlib import Path

    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):  # this package's files
        if not module.name.startswith("_") and module.name != "base":
            importlib.import_module(f"pipeline.extractors.{module.name}")
