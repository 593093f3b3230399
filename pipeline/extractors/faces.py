"""Face-branch visual features: a clip's main face, aligned and encoded, plus its expression.

The "face" branch of the dual-branch visual features (`frames` is the global branch).
Per clip, in the decode threads: `num_frames` frames sampled uniformly, faces detected
in each, one main face kept across the frames (`pipeline.backends.faces.main_face`), aligned by its
5 landmarks to the ArcFace template and preprocessed for the image encoder; with
`expression`, the same face also cropped the way the `fer` package crops for its
FER2013 net. The models then see every crop of every clip in a batch in one call each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.extractors.base import Extractor, ModelMissing, NotApplicable, register
from pipeline.backends.image import build_image_encoder, with_option_prefix
from pipeline.manifest import Clip
from pipeline.backends.onnx import OnnxModel, check_runtime, resolve_runtime

FER_DIM = 128 + 7  # FER embedding + class probabilities
FER_CHUNK = 256  # crops per FER forward pass: keeps the activations of all layers small


@dataclass(frozen=True)
class FacesOptions:
    detector: str = "yuface"  # yuface (offline default) | insightface (SCRFD, local model_dir)
    detector_options: dict[str, Any] = field(default_factory=dict)  # insightface: model_dir, det_file, nms_threshold
    detect_size: int = 320  # detector input: longer side (yuface) or square side (insightface)
    min_confidence: float = 0.5  # detections below this are dropped
    num_frames: int = 8  # sampled at the centres of equal segments of the clip
    max_side: int = 640  # decode-time downscale (longer side); crops are cut from these frames
    crop_size: int = 112  # aligned crop side (the ArcFace 112 template, scaled)
    encoder: str = "efficientnet_lite0"  # efficientnet_lite0 (offline default) | open_clip
    encoder_options: dict[str, Any] = field(default_factory=dict)  # see pipeline/backends/image.py
    expression: bool = True  # also run the fer package's FER2013 net: +128-d embedding, +7 probabilities
    expression_runtime: str = "auto"  # the FER net's: auto (onnxruntime on CPU) | torch | onnxruntime
    use_dataset_crops: bool = False  # sample clip.face_crops (openface_face/*.npy) where a clip has them


@dataclass
class FaceItem:
    """A prepared clip: its main-face crops (T = frames where that face was found)."""

    pixels: np.ndarray | None  # (T, 3, S, S) encoder input, None when T == 0
    fer: np.ndarray  # (T, 1, 64, 64) FER input in [-1, 1]
    sampled: int  # frames looked at


@register("faces")
class FacesExtractor(Extractor):
    """Main-face embeddings. With D the encoder's dim and E = 135 when `expression`, else 0:

    - `sequence` (T, D + E): per frame with the main face, [crop embedding (D) |
      FER embedding (128) | FER probabilities (7; angry disgust fear happy sad surprise neutral)]
    - `utterance` (D + E,): the mean of the sequence rows; zeros when no frame has a face
    - `face_fraction`: T / frames sampled; `present`: 1 when T > 0. A clip without a face
      is stored with present = 0, not recorded as a failure.
    """

    modality = "face"
    Options = FacesOptions
    output_keys = ("utterance", "sequence", "face_fraction", "present")
    sequence_keys = ("sequence",)

    def __init__(self, options: dict[str, Any] | None = None, where: str = "extract.<store>.options"):
        from pipeline.backends.faces import build_detector

        super().__init__(options, where)
        o = self.options
        if min(o.num_frames, o.max_side, o.detect_size, o.crop_size) < 1:
            raise ValueError("faces options num_frames, max_side, detect_size and crop_size must be >= 1")
        if not 0 <= o.min_confidence <= 1:
            raise ValueError(f"faces option min_confidence must be in [0, 1], got {o.min_confidence}")
        check_runtime(o.expression_runtime, f"{self.where}.expression_runtime")
        self.detector = build_detector(o.detector, o.detector_options, o.detect_size, o.min_confidence)
        self.encoder = build_image_encoder(o.encoder, o.encoder_options,
                                           where=f"{self.where}.encoder_options")
        # the libraries whose versions change values: decoding, resizing, detector, encoder
        self.packages = tuple(dict.fromkeys(("av", "opencv-python-headless", self.detector.package)
                                            + self.encoder.packages + ("onnx", "onnxruntime")))
        self.fer: Any = None  # the FER net in torch (KerasGraph) ...
        self.fer_onnx: OnnxModel | None = None  # ... or, when its runtime is onnxruntime, this

    def model_identity(self) -> dict[str, Any]:
        from pipeline.backends.faces import fer_identity

        detector = self.detector.identity()  # its ModelMissing already names detector_options.*
        try:
            encoder = self.encoder.identity()
        except ModelMissing as err:
            raise with_option_prefix(err, "encoder_options") from None
        return {"detector": detector, "encoder": encoder,
                "expression": fer_identity() if self.options.expression else None}

    def load(self, device: str = "cpu") -> None:
        from pipeline.backends.faces import FER_SIZE, load_fer

        super().load(device)
        self.detector.load(device)
        self.encoder.load(device)
        if self.options.expression:
            self.fer = load_fer(device)
            if resolve_runtime(self.options.expression_runtime, device,
                               f"{self.where}.expression_runtime") == "onnxruntime":
                self.fer_onnx = OnnxModel(self.fer, self.fer.modules, (1, FER_SIZE, FER_SIZE),
                                          ["embedding", "probabilities"])

    def prepare(self, clip: Clip) -> FaceItem:
        if self.options.use_dataset_crops and clip.face_crops:
            return self._from_dataset_crops(Path(clip.face_crops))
        if clip.video is None:
            raise NotApplicable(clip.name)
        return self._from_video(clip.video)

    def _from_video(self, video: str) -> FaceItem:
        import cv2

        from pipeline.backends.faces import align_face, fer_crop, main_face
        from pipeline.data.media import sample_frames

        o = self.options
        images = sample_frames(video, o.num_frames, o.max_side).images
        detections = [self.detector.detect(image) for image in images]
        crops, fer_faces = [], []
        for image, dets, k in zip(images, detections, main_face(detections)):
            if k is None:
                continue
            crops.append(align_face(image, dets.landmarks[k], o.crop_size))
            if o.expression:
                fer_faces.append(fer_crop(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), dets.boxes[k]))
        return self._item(crops, fer_faces, len(images))

    def _from_dataset_crops(self, path: Path) -> FaceItem:
        """`num_frames` crops at segment centres of the dataset's stacked BGR face crops.

        The crops are faces already: the encoder gets them whole, FER gets them greyed and
        resized to 64 px (no box, so no fer margin). All-black crops count as no face.
        """
        import cv2

        from pipeline.backends.faces import FER_SIZE

        stack = np.load(path, mmap_mode="r", allow_pickle=False)
        if stack.ndim != 4 or stack.shape[-1] != 3 or stack.dtype != np.uint8:
            raise ValueError(f"{path}: expected (frames, H, W, 3) uint8 BGR face crops, "
                             f"got {stack.shape} {stack.dtype}")
        n = self.options.num_frames
        index = ((np.arange(n) + 0.5) * len(stack) / n).astype(int) if len(stack) else []
        crops = [np.ascontiguousarray(stack[i, :, :, ::-1]) for i in index if stack[i].any()]
        fer_faces = [cv2.resize(cv2.cvtColor(c, cv2.COLOR_RGB2GRAY), (FER_SIZE, FER_SIZE))
                     for c in crops] if self.options.expression else []
        return self._item(crops, fer_faces, n)

    def _item(self, crops: list[np.ndarray], fer_faces: list[np.ndarray], sampled: int) -> FaceItem:
        from pipeline.backends.faces import FER_SIZE, fer_input

        pixels = self.encoder.preprocess(np.stack(crops)) if crops else None
        fer = fer_input(np.stack(fer_faces)) if fer_faces else np.zeros((0, 1, FER_SIZE, FER_SIZE), np.float32)
        return FaceItem(pixels, fer, sampled)

    def extract_batch(self, items: list[FaceItem]) -> list[dict[str, np.ndarray]]:
        counts = [0 if item.pixels is None else len(item.pixels) for item in items]
        pixels = [item.pixels for item in items if item.pixels is not None]
        # one encoder pass over every crop of every clip in the batch
        parts = [self.encoder.encode(np.concatenate(pixels)) if pixels
                 else np.zeros((0, self.encoder.dim), np.float32)]
        if self.options.expression:
            parts.append(self._expression(np.concatenate([item.fer for item in items])))
        rows = np.concatenate(parts, axis=1).astype(np.float32, copy=False)
        out = []
        for item, seq in zip(items, np.split(rows, np.cumsum(counts)[:-1])):
            present = len(seq) > 0
            out.append({"utterance": seq.mean(axis=0) if present else np.zeros(rows.shape[1], np.float32),
                        "sequence": seq, "face_fraction": np.float32(len(seq) / max(item.sampled, 1)),
                        "present": np.float32(present)})
        return out

    def _expression(self, faces: np.ndarray) -> np.ndarray:
        """(N, 1, 64, 64) -> (N, 135): FER embedding and class probabilities."""
        import torch

        chunks = [np.zeros((0, FER_DIM), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(faces), FER_CHUNK):
                if self.fer_onnx is not None:
                    chunks.append(np.concatenate(self.fer_onnx(faces[start:start + FER_CHUNK]), axis=1))
                    continue
                x = torch.from_numpy(faces[start:start + FER_CHUNK]).to(self.device)
                embedding, probs = self.fer(x)
                chunks.append(torch.cat([embedding, probs], dim=1).float().cpu().numpy())
        return np.concatenate(chunks)
