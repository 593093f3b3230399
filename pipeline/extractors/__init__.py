"""Feature extractors behind one interface; see `base.py`."""

from pipeline.extractors.base import (  # noqa: F401
    REGISTRY, Extractor, ModelMissing, NotApplicable, UnknownExtractor, available, get_extractor, register,
)
