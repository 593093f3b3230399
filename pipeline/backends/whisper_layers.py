"""Whisper encoder hidden states from inside the encoder, in PyTorch, from a CTranslate2 model.bin.

Why: CTranslate2 gives only the encoder's last output, and for emotion the middle blocks
carry more: on RAVDESS actors 01-08 (group 5-fold CV, logistic regression) the mean of
Whisper-base's blocks 2-5 scored 0.809 weighted F1 against 0.734 for the last output
(README "Audio: Whisper's middle layers"). So the weights the packages ship are read here
straight from CTranslate2's file and run by a small PyTorch encoder, the same layers in the
same order (checked against CTranslate2's float32 output in the tests).

The model.bin layout (CTranslate2 `models/model.cc`): uint32 binary version; from version 2
the spec name (uint16 length + bytes incl. NUL) and uint32 spec revision; uint32 number of
variables; per variable its name, uint8 rank, rank x uint32 dims, uint8 dtype, uint32 byte
count and the raw little-endian data. Only plain numbers are read: no pickle, no code.

By default each window is encoded at its own length rather than zero-padded to 30 s as
Whisper was trained (`pad_to_30s`): on RAVDESS CV the padded input scored 0.829 against
0.809 but costs 4.6 times as long on 2 cores. Windows of one call are zero-padded to the longest and
padded frames are masked out of attention, so a window's states do not depend on its batch.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.errors import MerError

# CTranslate2 DataType enum
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_FLOAT = (0, 4)


class WhisperWeightsError(MerError, RuntimeError):
    """A model.bin this reader cannot use (quantized, unknown format, not Whisper)."""


def _read(f: BinaryIO, fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise WhisperWeightsError(f"{f.name}: truncated CTranslate2 model.bin")
    return struct.unpack("<" + fmt, data)


def _string(f: BinaryIO) -> str:
    (n,) = _read(f, "H")
    return f.read(n).rstrip(b"\0").decode("utf-8")


def read_encoder_weights(path: Path) -> dict[str, np.ndarray]:
    """The `encoder/...` variables of a CTranslate2 Whisper model.bin, names without the prefix."""
    out: dict[str, np.ndarray] = {}
    with Path(path).open("rb") as f:
        (version,) = _read(f, "I")
        if not 2 <= version <= 6:
            raise WhisperWeightsError(f"{path}: CTranslate2 binary version {version} is not supported (2-6)")
        spec = _string(f)
        _read(f, "I")
        if spec != "WhisperSpec":
            raise WhisperWeightsError(f"{path}: holds a {spec!r}, not a Whisper model")
        (count,) = _read(f, "I")
        for _ in range(count):
            name = _string(f)
            (rank,) = _read(f, "B")
            dims = _read(f, "I" * rank)
            dtype, nbytes = _read(f, "B")[0], _read(f, "I")[0]
            if not name.startswith("encoder/"):
                f.seek(nbytes, 1)
                continue
            if dtype not in _DTYPES:
                raise WhisperWeightsError(f"{path}: variable {name} has CTranslate2 dtype {dtype}")
            if name.endswith("_scale") or (dtype not in _FLOAT and rank > 1):
                raise WhisperWeightsError(
                    f"{path} holds quantized weights ({name}); options.layers needs a float16 or "
                    "float32 model (ct2-transformers-converter --quantization float16)")
            out[name[len("encoder/"):]] = np.frombuffer(f.read(nbytes), _DTYPES[dtype]).reshape(dims)
    if "conv1/weight" not in out:
        raise WhisperWeightsError(f"{path}: no encoder weights found")
    return out


class WhisperLayers:
    """Whisper's encoder in PyTorch (float32), returning the hidden states after chosen blocks.

    Block k's state is the residual stream after k transformer blocks (0: the convolutions
    plus positions), before the final layer norm; only blocks up to the deepest asked run.
    """

    def __init__(self, model_bin: Path, device: str, layers: list[int]):
        import torch

        weights = read_encoder_weights(model_bin)
        self.blocks = sum(1 for k in weights if k.endswith("/self_attention/linear_1/bias"))
        self.layers = [k if k >= 0 else self.blocks + 1 + k for k in layers]
        bad = [k for k, r in zip(layers, self.layers) if not 0 <= r <= self.blocks]
        if bad:
            raise WhisperWeightsError(f"options.layers {bad} out of range: this encoder has blocks "
                                      f"1..{self.blocks} (0 = its input embeddings, negative from the end)")
        self.heads = int(weights["num_heads"]) if "num_heads" in weights else 8
        self.device = torch.device(device)
        self.w = {k: torch.from_numpy(v.astype(np.float32)).to(self.device)
                  for k, v in weights.items() if v.ndim > 0}
        self.width = self.w["conv1/bias"].shape[0]

    def __call__(self, mels: list[np.ndarray]) -> list[np.ndarray]:
        """Each (n_mels, 2*T) log-mel -> (len(layers), T, width) float32 states."""
        return self._states(mels, self.layers)

    def _states(self, mels: list[np.ndarray], layers: list[int]) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        w, width = self.w, self.width
        frames = [m.shape[1] // 2 for m in mels]
        longest = max(frames)
        batch = np.zeros((len(mels), mels[0].shape[0], 2 * longest), np.float32)
        for i, m in enumerate(mels):
            batch[i, :, : 2 * frames[i]] = m[:, : 2 * frames[i]]
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            x = F.gelu(F.conv1d(x, w["conv1/weight"], w["conv1/bias"], padding=1))
            x = F.gelu(F.conv1d(x, w["conv2/weight"], w["conv2/bias"], stride=2, padding=1)).transpose(1, 2)
            x = x + w["position_encodings/encodings"][: x.shape[1]]
            keep = torch.arange(longest, device=self.device)[None, :] < torch.tensor(frames, device=self.device)[:, None]
            mask = keep[:, None, None, :]  # (B, 1, 1, T): padded keys get no attention
            states = {0: x}
            b, t, _ = x.shape

            def heads(v: torch.Tensor) -> torch.Tensor:
                return v.view(b, t, self.heads, width // self.heads).transpose(1, 2)

            for k in range(1, max(layers) + 1):
                p = f"layer_{k - 1}/"
                y = F.layer_norm(x, (width,), w[p + "self_attention/layer_norm/gamma"],
                                 w[p + "self_attention/layer_norm/beta"])
                q, key, v = F.linear(y, w[p + "self_attention/linear_0/weight"],
                                     w[p + "self_attention/linear_0/bias"]).split(width, -1)
                a = F.scaled_dot_product_attention(heads(q), heads(key), heads(v), attn_mask=mask)
                x = x + F.linear(a.transpose(1, 2).reshape(b, t, width),
                                 w[p + "self_attention/linear_1/weight"], w[p + "self_attention/linear_1/bias"])
                y = F.layer_norm(x, (width,), w[p + "ffn/layer_norm/gamma"], w[p + "ffn/layer_norm/beta"])
                x = x + F.linear(F.gelu(F.linear(y, w[p + "ffn/linear_0/weight"], w[p + "ffn/linear_0/bias"])),
                                 w[p + "ffn/linear_1/weight"], w[p + "ffn/linear_1/bias"])
                states[k] = x
            stacked = torch.stack([states[k] for k in layers], 1).cpu().numpy()
        return [stacked[i, :, : frames[i]] for i in range(len(mels))]

    def final_output(self, mels: list[np.ndarray]) -> list[np.ndarray]:
        """The encoder's last output (after its final layer norm), for checking against CTranslate2."""
        import torch
        import torch.nn.functional as F

        last = self._states(mels, [self.blocks])
        g, b = self.w["layer_norm/gamma"], self.w["layer_norm/beta"]
        return [F.layer_norm(torch.from_numpy(s[0]), (self.width,), g.cpu(), b.cpu()).numpy() for s in last]
