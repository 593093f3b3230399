"""Faces: detection backends, 5-point alignment and main-face tracking (the FER net: pipeline/backends/fer.py).

Detectors return `Detections` in the pixel coordinates of the image they were given.
`yuface` (libfacedetection, weights compiled into the wheel) is the offline default;
`insightface` runs SCRFD (e.g. buffalo_l's det_10g.onnx) from a local folder with onnxruntime.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.config import from_dict
from pipeline.errors import ModelMissing
from pipeline.backends.image import file_fingerprint
from pipeline.backends.fer import (FER_CLASSES, FER_SIZE, fer_crop, fer_identity, fer_input,  # noqa: F401
                                   fer_weights_path, load_fer)

# insightface's arcface_dst: image-left eye, image-right eye, nose tip, mouth corners (112 px crop)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
TRACK_MIN_IOU = 0.2  # sampled frames lie ~1 s apart: faces move, so link loosely


@dataclass(frozen=True)
class Detections:
    """Faces in one image: scores (N,) in [0, 1], boxes (N, 4) x1 y1 x2 y2, landmarks (N, 5, 2)."""

    scores: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros(0, np.float32), np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, index: np.ndarray) -> Detections:
        return Detections(self.scores[index], self.boxes[index], self.landmarks[index])

    def scaled(self, factor: float) -> Detections:
        """Coordinates multiplied by `factor` (back from a resized detection input)."""
        return Detections(self.scores, self.boxes * factor, self.landmarks * factor)


@dataclass(frozen=True)
class YuFaceOptions:
    pass  # the CNN is compiled in; nothing to set


@dataclass(frozen=True)
class ScrfdOptions:
    model_dir: str = ""  # a local insightface model folder, e.g. ~/.insightface/models/buffalo_l
    det_file: str = "det_10g.onnx"
    nms_threshold: float = 0.4  # insightface's default


class YuFaceDetector:
    """libfacedetection's CNN from the `yuface` wheel; thread-safe, CPU only.

    The library is called through ctypes, not yuface's Python binding: the binding holds
    the GIL for the whole ~8 ms detection, so two decode threads detected no faster than
    one (8.9 vs 8.3 ms per 320x240 frame) and stalled the model thread; a ctypes call
    releases it (4.0 ms per frame with two threads). The results are the binding's own.
    """

    package = "yuface"
    _SYMBOL = "_Z14facedetect_cnnPhS_iii"  # int* facedetect_cnn(uchar* result, uchar* bgr, int w, int h, int step)
    _RESULT_BYTES = 0x40000  # the library needs 0x9000 (an int count, then 16 int16 per face)

    def __init__(self, options: dict[str, Any], detect_size: int, min_confidence: float):
        from_dict(YuFaceOptions, options, "extract.<store>.options.detector_options")
        self.detect_size, self.min_confidence = detect_size, min_confidence
        self._omp: list[tuple[Any, Any]] = []  # (get, set) thread counts of the OpenMP runtimes
        self._cnn: Any = None

    @staticmethod
    def _library() -> Path:
        spec = importlib.util.find_spec("yuface")
        if spec is None:
            raise ModelMissing("detector", "insightface (with detector_options.model_dir), or the pip "
                               "package 'yuface' installed", "yuface")
        return Path(spec.origin).parent / "libfacedetection.so"

    def identity(self) -> dict[str, Any]:
        lib = self._library()
        return {"name": "yuface", "library": lib.name, **file_fingerprint(lib)}

    def load(self, device: str) -> None:
        import ctypes

        import yuface

        # The CNN runs OpenMP teams; called from several decode threads at once their
        # busy-waiting burnt 25x the CPU of one thread per call (1.9 s vs 0.08 s per clip
        # here), so each call runs on one thread and the decode threads give the
        # parallelism. Its GOMP calls bind to a globally loaded OpenMP runtime (torch's)
        # when there is one, else to yuface's vendored libgomp: set both.
        runtimes = [ctypes.CDLL(None)] + [ctypes.CDLL(str(lib)) for lib in
                                          (Path(yuface.__file__).parent.parent / "yuface.libs").glob("libgomp*.so*")]
        self._omp = [(rt.omp_get_max_threads, rt.omp_set_num_threads) for rt in runtimes
                     if hasattr(rt, "omp_set_num_threads")]
        path = self._library()
        library = ctypes.CDLL(str(path))
        if not hasattr(library, self._SYMBOL):
            raise RuntimeError(f"{path}: no facedetect_cnn in this build of yuface "
                               f"{importlib.metadata.version('yuface')}; install yuface==2023.5.1, as "
                               "pyproject.toml pins it")
        cnn = getattr(library, self._SYMBOL)
        cnn.restype = ctypes.c_void_p
        cnn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._cnn = cnn
        self.detect(np.zeros((32, 32, 3), np.uint8))  # the library sets its weights up on first use

    def detect(self, rgb: np.ndarray) -> Detections:
        before = [get() for get, _ in self._omp]  # OpenMP settings are per thread: restore them
        for _, set_threads in self._omp:
            set_threads(1)
        try:
            return self._detect(rgb)
        finally:
            for (_, set_threads), n in zip(self._omp, before):
                set_threads(n)

    def _detect(self, rgb: np.ndarray) -> Detections:
        if self._cnn is None:
            raise RuntimeError("yuface detector: call load() before detect()")
        small, scale = _resize_longest(rgb, self.detect_size)
        bgr = np.ascontiguousarray(small[..., ::-1])
        height, width = bgr.shape[:2]
        result = np.zeros(self._RESULT_BYTES, np.uint8)
        self._cnn(result.ctypes.data, bgr.ctypes.data, width, height, width * 3)
        count = min(int(result[:4].view(np.int32)[0]), (self._RESULT_BYTES - 4) // 32)
        # per face: confidence 0-100, x y w h, 5 x,y landmarks, 1 unused; yuface keeps conf > threshold
        faces = result[4: 4 + 32 * count].view(np.int16).reshape(count, 16)
        faces = faces[faces[:, 0] > self.min_confidence * 100]
        if len(faces) == 0:
            return Detections.empty()
        xywh = faces[:, 1:5].astype(np.float32)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        dets = Detections(faces[:, 0].astype(np.float32) / 100, boxes,
                          faces[:, 5:15].astype(np.float32).reshape(-1, 5, 2))
        return dets.scaled(1 / scale)


class ScrfdDetector:
    """insightface's SCRFD ONNX (with keypoints), preprocessed and decoded as insightface does."""

    package = "onnxruntime"

    def __init__(self, options: dict[str, Any], detect_size: int, min_confidence: float):
        self.options = from_dict(ScrfdOptions, options, "extract.<store>.options.detector_options")
        self.detect_size, self.min_confidence = detect_size, min_confidence
        self.session: Any = None

    def _path(self) -> Path:
        folder = Path(self.options.model_dir).expanduser() if self.options.model_dir else None
        if folder is None or not (folder / self.options.det_file).is_file():
            raise ModelMissing("detector_options.model_dir", f"a local insightface model folder with "
                               f"{self.options.det_file} (e.g. ~/.insightface/models/buffalo_l)",
                               self.options.model_dir)
        return folder / self.options.det_file

    def identity(self) -> dict[str, Any]:
        path = self._path()
        return {"name": "insightface-scrfd", "file": path.name, **file_fingerprint(path)}

    def load(self, device: str) -> None:
        import onnxruntime as ort

        cuda = device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self._path()), providers=providers)

    def detect(self, rgb: np.ndarray) -> Detections:
        size = self.detect_size
        ratio = rgb.shape[0] / rgb.shape[1]
        new_h, new_w = (size, int(size / ratio)) if ratio > 1 else (int(size * ratio), size)
        canvas = np.zeros((size, size, 3), np.uint8)  # top-left placement, as insightface
        canvas[:new_h, :new_w] = cv2.resize(rgb, (new_w, new_h))
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        inputs = {self.session.get_inputs()[0].name: blob}
        outputs = self.session.run(None, inputs)
        dets = decode_scrfd(outputs, (size, size), self.min_confidence, self.options.nms_threshold)
        return dets.scaled(rgb.shape[0] / new_h)


def decode_scrfd(outputs: list[np.ndarray], input_hw: tuple[int, int], threshold: float,
                 nms_threshold: float) -> Detections:
    """SCRFD heads (scores, box distances, keypoint offsets per stride) -> NMS'd detections."""
    if len(outputs) not in (9, 15):
        raise ValueError(f"SCRFD model has {len(outputs)} outputs; alignment needs a keypoint model "
                         "(9 or 15 outputs, e.g. det_10g.onnx)")
    fmc = len(outputs) // 3
    strides, anchors = ((8, 16, 32), 2) if fmc == 3 else ((8, 16, 32, 64, 128), 1)
    parts = []
    for i, stride in enumerate(strides):
        head = [outputs[i + k * fmc] for k in range(3)]
        head = [h[0] if h.ndim == 3 else h for h in head]  # batched exports carry a batch axis
        grid = np.stack(np.mgrid[: input_hw[0] // stride, : input_hw[1] // stride][::-1], axis=-1)
        centers = np.repeat(grid.reshape(-1, 2).astype(np.float32) * stride, anchors, axis=0)
        scores, dist, kps = head[0].reshape(-1), head[1].reshape(-1, 4) * stride, head[2].reshape(-1, 5, 2) * stride
        keep = scores >= threshold
        c = centers[keep]
        boxes = np.concatenate([c - dist[keep, :2], c + dist[keep, 2:]], axis=1)
        parts.append(Detections(scores[keep], boxes, c[:, None, :] + kps[keep]))
    dets = Detections(*(np.concatenate([getattr(p, k) for p in parts]).astype(np.float32)
                        for k in ("scores", "boxes", "landmarks")))
    return dets.take(nms(dets.boxes, dets.scores, nms_threshold))


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes (N, 4) and (M, 4), x1 y1 x2 y2."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best first."""
    order, keep = np.argsort(-scores, kind="stable"), []
    while len(order):
        keep.append(order[0])
        order = order[1:][iou(boxes[order[:1]], boxes[order[1:]])[0] <= threshold]
    return np.array(keep, dtype=np.int64)


def build_detector(name: str, options: dict[str, Any], detect_size: int,
                   min_confidence: float) -> YuFaceDetector | ScrfdDetector:
    backends = {"yuface": YuFaceDetector, "insightface": ScrfdDetector}
    if name not in backends:
        raise ValueError(f"params key 'extract.<store>.options.detector' is {name!r}; "
                         f"use one of {', '.join(sorted(backends))}")
    return backends[name](options, detect_size, min_confidence)


def _resize_longest(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    scale = size / max(image.shape[:2])
    h, w = (max(1, round(n * scale)) for n in image.shape[:2])
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interpolation), scale


# ---- alignment ----------------------------------------------------------------------------

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991) taking points `src` onto `dst`, as a 2x3 matrix."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s0, d0 = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d0.T @ s0 / len(src))
    flip = np.diag([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rotation = u @ flip @ vt
    scale = float((sig * np.diag(flip)).sum() / ((s0 ** 2).sum() / len(src)))
    return np.hstack([scale * rotation, (mu_d - scale * rotation @ mu_s)[:, None]])


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp `image` so the 5 landmarks land on the ArcFace template scaled to `size` px."""
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE * (size / 112.0))
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


# ---- main face ----------------------------------------------------------------------------

def link_tracks(frames: list[Detections], min_iou: float = TRACK_MIN_IOU) -> list[np.ndarray]:
    """Greedy IoU linking across frames: per frame, the track id of each detection."""
    last_box: list[np.ndarray] = []  # per track, its most recent box (tracks survive gaps)
    ids = []
    for dets in frames:
        frame_ids = np.full(len(dets), -1, dtype=np.int64)
        if last_box and len(dets):
            overlap = iou(dets.boxes, np.stack(last_box))
            for flat in np.argsort(-overlap, axis=None, kind="stable"):
                d, t = np.unravel_index(flat, overlap.shape)
                if overlap[d, t] < min_iou:
                    break
                if frame_ids[d] < 0 and t not in frame_ids:
                    frame_ids[d] = t
        for d in np.flatnonzero(frame_ids < 0):
            frame_ids[d] = len(last_box)
            last_box.append(dets.boxes[d])
        for d, t in enumerate(frame_ids):
            last_box[t] = dets.boxes[d]
        ids.append(frame_ids)
    return ids


def main_face(frames: list[Detections], min_iou: float = TRACK_MIN_IOU) -> list[int | None]:
    """Per frame, the index of the main face's detection (None where it is absent).

    Detections are linked into tracks by IoU; the main face is the track with the largest
    sum of area x confidence over the frames (not the longest track): a big face seen in
    most frames beats a small one seen in all, and a one-frame false positive wins only if
    it outweighs a whole track (8x a face's area when that face is in all 8 frames).
    """
    ids = link_tracks(frames, min_iou)
    weight: dict[int, float] = {}
    for dets, frame_ids in zip(frames, ids):
        sizes = np.prod(np.clip(dets.boxes[:, 2:] - dets.boxes[:, :2], 0, None), axis=1) * dets.scores
        for t, s in zip(frame_ids, sizes):
            weight[int(t)] = weight.get(int(t), 0.0) + float(s)
    if not weight:
        return [None] * len(frames)
    anchor = max(sorted(weight), key=lambda t: weight[t])
    return [int(np.flatnonzero(f == anchor)[0]) if anchor in f else None for f in ids]
