"""Who speaks, not how they feel: a speaker embedding per clip (store `speaker`).

Not a training input. The trainer reads it only to find pseudo-speakers when the dataset
names none (`train.speaker_norm`, pipeline/fusion/speakers.py): a corpus in the MER2025
layout has no speaker column, and normalising per speaker is worth 10+ weighted-F1 points
on unseen actors (README "Fusion").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends import audio as enc
from pipeline.backends import voice
from pipeline.extractors.base import Extractor, ModelMissing, NotApplicable, register
from pipeline.manifest import Clip


@dataclass(frozen=True)
class VoiceEncoderOptions:
    model_path: str | None = None  # a Resemblyzer-format .pt (GE2E state dict); None: the packaged one
    max_seconds: float = 30.0  # longer audio is cut: a voice is known in seconds
    silence_dbfs: float = -60.0  # a clip whose peak is below this has no voice (present=0)

    def __post_init__(self) -> None:
        if not self.max_seconds > 0:
            raise ValueError(f"options.max_seconds must be > 0, got {self.max_seconds!r}")


@register("voice_encoder")
class VoiceEncoderExtractor(Extractor):
    """GE2E speaker embedding (Resemblyzer's weights): one unit vector of 256 per clip."""

    modality = "audio"
    Options = VoiceEncoderOptions
    output_keys = ("utterance", "present")
    packages = ("numpy", "torch", "librosa", "av")

    def _weights(self) -> Path:
        path = self.options.model_path
        weights = Path(path).expanduser() if path else voice.packaged_weights()
        if weights is None or not weights.is_file():
            raise ModelMissing("model_path", "a GE2E speaker-encoder .pt in Resemblyzer's format, or install "
                               "the package resemblyzer==0.1.4 (`make install` does)", path)
        return weights

    def model_identity(self) -> dict[str, Any]:
        return {"model": "ge2e voice encoder (resemblyzer)", "weights": enc.file_digest(self._weights())}

    def load(self, device: str = "cpu") -> None:
        self.device = device
        self.encoder = voice.VoiceEncoder(self._weights(), device)

    def prepare(self, clip: Clip) -> tuple[np.ndarray, float]:
        from pipeline.data.media import clip_audio

        if not clip.has_audio:
            raise NotApplicable(clip.name)
        audio = clip_audio(clip.audio, clip.video, voice.SAMPLE_RATE)
        audio = audio[: int(self.options.max_seconds * voice.SAMPLE_RATE)]
        return voice.partials(audio), float(enc.peak_dbfs(audio) > self.options.silence_dbfs)

    def extract_batch(self, items: list[tuple[np.ndarray, float]]) -> list[dict[str, np.ndarray]]:
        embeddings = self.encoder.embed([p for p, _ in items])
        return [{"utterance": e, "present": np.float32(present)} for e, (_, present) in zip(embeddings, items)]
