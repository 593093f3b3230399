"""Subtitle embeddings: the Chinese and/or English subtitle through a text encoder.

`language: both` (the default) encodes the Chinese and the English subtitle separately
and stores them side by side, `[chinese | english]` (2·D), rather than encoding the two
joined into one string: each half then always means the same language, a classifier can
weigh them apart, and a clip missing one subtitle gets zeros in that half, with
`languages[i] = 0` recording which half is absent. Each half is L2-normalised on its own
(with `normalize: true`), so a full clip has norm √2 and a one-sided clip norm 1.
The encoders live in `pipeline.backends.text`, shared with the LLM-enrichment stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.extractors.base import Extractor, NotApplicable, register
from pipeline.manifest import Clip
from pipeline.backends.text import TextEncoder, build_text_encoder

SEEN_TEXTS = 50_000  # vectors kept per run for repeated subtitles (50k x 384 floats: 77 MB)
LANGUAGES = {"chinese": ("chinese",), "english": ("english",), "both": ("chinese", "english")}


@dataclass(frozen=True)
class TextOptions:
    backend: str = "e5"  # e5 (shipped multilingual-e5-small) | transformers (a local HF folder)
    model_path: str = ""  # transformers: the local encoder folder; must stay "" for e5
    language: str = "both"  # chinese | english | both ([chinese | english], see module doc)
    layers: int | None = None  # transformers: sum of the last N hidden states (None: 4)
    max_length: int | None = None  # transformers: tokens kept per subtitle (None: the model's limit)
    normalize: bool = True  # L2-normalise each vector (e5 always does)
    prefix: str | None = None  # None: the backend's default ("query: " for e5 features, "" else)


@register("text")
class SubtitleEncoder(Extractor):
    """One vector per clip from its subtitle(s); `languages` marks which halves hold text."""

    modality = "text"
    Options = TextOptions
    output_keys = ("utterance", "present", "languages")
    packages = ("numpy",)

    def __init__(self, options: dict[str, Any] | None = None, where: str = "extract.<store>.options"):
        super().__init__(options, where)
        self.encoder = self._build_encoder()  # settings only: a wrong option fails here, fast
        self._seen: dict[str, np.ndarray] = {}  # subtitle -> vector, this run (insertion order: oldest first)

    def _build_encoder(self) -> TextEncoder:
        o = self.options
        where = self.where
        if o.language not in LANGUAGES:
            raise ConfigError(f"{where}.language is {o.language!r}; use one of {', '.join(LANGUAGES)}")
        extra = {"model_path": o.model_path or None, "layers": o.layers, "max_length": o.max_length,
                 "prefix": o.prefix}
        given = {k: v for k, v in extra.items() if v is not None}
        unused = sorted(set(given) - {"prefix"})
        if o.backend == "e5" and unused:
            raise ConfigError(f"{where}: {unused} are not used by backend 'e5'; "
                              "remove them or set backend: transformers")
        try:
            return build_text_encoder(o.backend, normalize=o.normalize, **given)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None

    def model_identity(self) -> dict[str, Any]:
        return self.encoder.identity()

    def versions(self) -> dict[str, str]:
        return {**super().versions(), **self.encoder.versions()}

    def load(self, device: str = "cpu") -> None:
        self.device = device
        self.encoder.load(device)
        self._seen = {}  # vectors of the model just loaded only

    def prepare(self, clip: Clip) -> tuple[str | None, ...]:
        texts = tuple(getattr(clip, lang).strip() or None for lang in LANGUAGES[self.options.language])
        if all(t is None for t in texts):
            raise NotApplicable(clip.name)
        return texts

    def extract_batch(self, items: list[tuple[str | None, ...]]) -> list[dict[str, np.ndarray]]:
        # each distinct subtitle not seen before in this run, in one encode call across clips:
        # corpora repeat lines (an acted corpus has 2 sentences over 1,248 clips; MELD 9 % repeats)
        distinct = list(dict.fromkeys(t for item in items for t in item if t is not None))
        new = [t for t in distinct if t not in self._seen]
        vectors = {t: self._seen[t] for t in distinct if t in self._seen}
        vectors.update(zip(new, self.encoder.encode(new) if new else []))
        for text in new:
            if len(self._seen) >= SEEN_TEXTS:  # bounded: the oldest text goes first
                del self._seen[next(iter(self._seen))]
            self._seen[text] = vectors[text]
        dim = self.encoder.dim
        out = []
        for item in items:
            halves = [vectors[t] if t is not None else np.zeros(dim, np.float32) for t in item]
            out.append({"utterance": np.concatenate(halves).astype(np.float32),
                        "present": np.float32(1.0),
                        "languages": self._languages(item)})
        return out

    def _languages(self, item: tuple[str | None, ...]) -> np.ndarray:
        """[chinese, english]: 1 where that subtitle was encoded into the vector."""
        flags = dict(zip(LANGUAGES[self.options.language], (t is not None for t in item)))
        return np.array([flags.get("chinese", False), flags.get("english", False)], np.float32)
