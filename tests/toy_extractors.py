"""A deterministic, model-free extractor for engine and store tests.

Its outputs depend only on the clip name, so an interrupted-and-resumed run can be
compared value for value with an uninterrupted one. `TOY_SLEEP` slows it down so a
test can kill it halfway; `TOY_CALL_LOG` records every clip it processes. `TOY_DIE_ON`
names a clip on which the process kills itself (kill -9, like an OOM kill or a decoder
crash); with `TOY_DIE_ONCE` set to a file path it dies only while that file is absent,
creating it first, so the retry of that clip goes through.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from dataclasses import dataclass

import numpy as np

from pipeline.extractors.base import Extractor, NotApplicable, register
from pipeline.manifest import Clip


@dataclass(frozen=True)
class ToyOptions:
    dim: int = 4
    fail_on: str = ""  # clip names containing this raise in extract_batch


@register("toy")
class ToyExtractor(Extractor):
    """Deterministic vectors from the clip name."""

    modality = "text"
    Options = ToyOptions
    output_keys = ("utterance", "sequence")
    sequence_keys = ("sequence",)

    def prepare(self, clip: Clip) -> str:
        if not clip.has_text:
            raise NotApplicable(clip.name)
        return clip.name

    def extract_batch(self, items: list[str]) -> list[dict[str, np.ndarray]]:
        out = []
        for name in items:
            if self.options.fail_on and self.options.fail_on in name:
                raise RuntimeError(f"toy failure on {name}")
            time.sleep(float(os.environ.get("TOY_SLEEP", "0")))
            if name == os.environ.get("TOY_DIE_ON"):
                _die()
            seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
            rng = np.random.default_rng(seed)
            out.append({"utterance": rng.standard_normal(self.options.dim).astype(np.float32),
                        "sequence": rng.standard_normal((1 + seed % 5, 2)).astype(np.float32)})
            log_path = os.environ.get("TOY_CALL_LOG")
            if log_path:
                with open(log_path, "a", encoding="utf-8") as fh:
                    fh.write(name + "\n")
        return out


def _die() -> None:
    once = os.environ.get("TOY_DIE_ONCE")
    if once:
        if Path(once).exists():
            return
        Path(once).touch()
    os.kill(os.getpid(), signal.SIGKILL)
