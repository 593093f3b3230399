"""Thin DVC stage entry points: argv paths -> params section -> library call.

`entry_point` is the one error boundary: a known user error prints one clear line
(no traceback) and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.config import ConfigError
    from pipeline.enrich import EnrichmentFailed
    from pipeline.extract import ExtractionFailed, ModelMissingError
    from pipeline.extractors.base import UnknownExtractor
    from pipeline.ingest import IngestError
    from pipeline.llm import LLMError
    from pipeline.store import FingerprintMismatch, StoreError

    return (ConfigError, IngestError, FingerprintMismatch, StoreError, ExtractionFailed,
            UnknownExtractor, ModelMissingError, LLMError, EnrichmentFailed, FileNotFoundError)


def entry_point(func: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(func)
    def wrapper(argv: list[str] | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            func(argv)
        except _user_errors() as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)
    return wrapper
