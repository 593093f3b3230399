"""Thin DVC stage entry points: argv paths -> params section -> library call.

`entry_point` is the one error boundary: a user error (`pipeline.errors.MerError`, or a
missing input file) prints one clear line (no traceback) and exits 1; anything else is a
bug and keeps its traceback. It imports only `pipeline.errors`, so a stage pulls in no
more of the package than it uses.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

from pipeline.errors import MerError


def user_message(err: BaseException) -> str:
    """The one line a user sees for a known error."""
    return err.message() if isinstance(err, MerError) else str(err)


def entry_point(func: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(func)
    def wrapper(argv: list[str] | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            func(argv)
        except (MerError, FileNotFoundError) as err:
            print(f"error: {user_message(err)}", file=sys.stderr)
            sys.exit(1)
    return wrapper
