"""The one error base class: every error a user can fix derives from `MerError`.

Library code raises these with a message that names the file, the params key and the
fix; the boundaries (`pipeline.stages.entry_point`, the `mer` command) catch `MerError`
and print that message as one line, without a traceback. Anything else is a bug and
keeps its traceback. This module imports nothing from the package, so any layer may
raise these without pulling in a higher one.
"""

from __future__ import annotations


class MerError(Exception):
    """A problem with the user's data, params or environment; the message says the fix."""

    def message(self) -> str:
        # KeyError subclasses would print their argument quoted; show the text itself.
        return str(self.args[0]) if self.args else type(self).__name__


class ConfigError(MerError, ValueError):
    """A params value is missing, unknown, of the wrong type or out of range; the message names the key."""


class ModelMissing(MerError, RuntimeError):
    """A backend's weights are not on disk. Raised by `model_identity()`, before any work.

    `option` is the key under `extract.<store>.options` that must point at them; the
    engine turns this into one line naming the full params key and what to put there.
    """

    def __init__(self, option: str, expected: str, got: object = None):
        super().__init__(f"options.{option}: {expected} (now {got!r})")
        self.option, self.expected, self.got = option, expected, got

    def for_store(self, store: str) -> str:
        return f"params key 'extract.{store}.options.{self.option}' must name {self.expected}; now {self.got!r}"


class ModelMissingError(MerError, RuntimeError):
    """A production backend's weights are not where params say; nothing was run (the message names the key)."""


class ExtractionFailed(MerError, RuntimeError):
    """Too many clips failed; finished clips are kept and a rerun retries the rest."""


class LLMError(MerError, RuntimeError):
    """An LLM call failed for good (after retries); the message names the URL and the reason."""


class DeviceMissing(MerError, RuntimeError):
    """Params ask for a device (cuda) that this machine does not have; the message names the key."""


class TrainError(MerError, ValueError):
    """Training cannot give a true number (no usable clips, a non-finite loss, folds that cannot be made)."""
