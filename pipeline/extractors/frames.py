"""Global-frame visual features: N frames sampled uniformly over the clip, each encoded whole.

The "global" branch of the dual-branch visual features (the face branch encodes face
crops with the same encoders). Decoding and preprocessing run in the engine's decode
threads; the model sees every frame of every clip in a batch in one `encode` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.extractors.base import Extractor, ModelMissing, NotApplicable, register
from pipeline.backends.image import build_image_encoder, with_option_prefix
from pipeline.manifest import Clip


@dataclass(frozen=True)
class FramesOptions:
    encoder: str = "efficientnet_lite0"  # efficientnet_lite0 (offline default) | open_clip
    encoder_options: dict[str, Any] = field(default_factory=dict)  # see pipeline/backends/image.py
    num_frames: int = 8  # sampled at the centres of equal segments of the clip
    max_side: int = 448  # decode-time downscale (longer side); keeps decoding cheap


@register("frames")
class FramesExtractor(Extractor):
    """`sequence` (num_frames, D): one vector per sampled frame; `utterance` (D,): their mean."""

    modality = "video"
    Options = FramesOptions
    output_keys = ("utterance", "sequence")
    sequence_keys = ("sequence",)

    def __init__(self, options: dict[str, Any] | None = None, where: str = "extract.<store>.options"):
        super().__init__(options, where)
        o = self.options
        if o.num_frames < 1 or o.max_side < 1:
            raise ValueError(f"frames options num_frames and max_side must be >= 1, got "
                             f"{o.num_frames} and {o.max_side}")
        self.encoder = build_image_encoder(o.encoder, o.encoder_options,
                                           where=f"{self.where}.encoder_options")
        self.packages = ("av",) + self.encoder.packages  # the encoder's libraries change values

    def model_identity(self) -> dict[str, Any]:
        try:
            return self.encoder.identity()
        except ModelMissing as err:
            raise with_option_prefix(err, "encoder_options") from None

    def load(self, device: str = "cpu") -> None:
        super().load(device)
        self.encoder.load(device)

    def prepare(self, clip: Clip) -> np.ndarray:
        from pipeline.data.media import sample_frames

        if clip.video is None:
            raise NotApplicable(clip.name)
        frames = sample_frames(clip.video, self.options.num_frames, self.options.max_side)
        return self.encoder.preprocess(frames.images)

    def extract_batch(self, items: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        features = self.encoder.encode(np.concatenate(items))  # one pass over all clips' frames
        bounds = np.cumsum([len(item) for item in items])[:-1]
        return [{"utterance": seq.mean(axis=0), "sequence": seq}
                for seq in np.split(features, bounds)]
