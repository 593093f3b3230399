"""A speaker (voice) encoder: the GE2E LSTM of Resemblyzer (Wan et al. 2018, "Generalized
End-to-End Loss for Speaker Verification"), weights from the `resemblyzer` package (Apache-2.0).

Only the weights file is taken from the package: its own code loads it with a plain
`torch.load` and trims silences with webrtcvad, a compiled dependency we do not need. Here
the network is rebuilt (3-layer LSTM over 40 mel bands, a linear layer, ReLU, L2 norm), the
weights load with `weights_only=True`, and the mel spectrogram is the same as Resemblyzer's
(`librosa.feature.melspectrogram`, 25 ms Hann window, 10 ms hop, power 2, zero-padded
centre) in numpy, checked against librosa in the tests. An utterance's embedding is the
L2-normed mean of the embeddings of its 1.6 s partial windows at a 0.8 s hop, as Resemblyzer
embeds an utterance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
N_FFT, HOP, N_MELS = 400, 160, 40  # 25 ms, 10 ms, 40 bands
PARTIAL_FRAMES, PARTIAL_HOP = 160, 80  # 1.6 s windows every 0.8 s
TARGET_DBFS = -30.0  # quiet clips are raised to this loudness first (never lowered), as Resemblyzer does


def packaged_weights() -> Path | None:
    """`pretrained.pt` inside the installed `resemblyzer` package, or None."""
    import importlib.util

    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained.pt"
    return path if path.is_file() else None


def mel_spectrogram(audio: np.ndarray) -> np.ndarray:
    """(frames, 40) mel power spectrogram, equal to librosa.feature.melspectrogram's transpose."""
    import librosa.filters  # pure numpy; librosa's numba kernels are never called

    y = np.pad(audio.astype(np.float32), N_FFT // 2)
    if len(y) < N_FFT:
        y = np.pad(y, (0, N_FFT - len(y)))
    frames = np.lib.stride_tricks.sliding_window_view(y, N_FFT)[::HOP]
    window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann, as scipy's get_window('hann')
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS)
    return (power @ mel.T).astype(np.float32)


def partials(audio: np.ndarray) -> np.ndarray:
    """(P, 160, 40): the loudness-raised clip's mel frames in 1.6 s windows every 0.8 s (the
    last one, or a clip shorter than 1.6 s, zero-padded)."""
    rms_db = 10 * np.log10(max(float(np.mean(audio.astype(np.float64) ** 2)), 1e-12))
    if rms_db < TARGET_DBFS:
        audio = audio * np.float32(10 ** ((TARGET_DBFS - rms_db) / 20))
    mel = mel_spectrogram(audio)
    starts = range(0, max(1, len(mel) - PARTIAL_FRAMES + 1), PARTIAL_HOP)
    out = np.zeros((len(starts), PARTIAL_FRAMES, N_MELS), np.float32)
    for i, s in enumerate(starts):
        part = mel[s:s + PARTIAL_FRAMES]
        out[i, : len(part)] = part
    return out


class VoiceEncoder:
    """GE2E speaker encoder on `device`; `embed` maps clips' partials to unit vectors (256-d)."""

    def __init__(self, weights: Path, device: str = "cpu"):
        import torch

        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("model_state", state)
        self.lstm = torch.nn.LSTM(N_MELS, 256, 3, batch_first=True)
        self.linear = torch.nn.Linear(256, 256)
        self.lstm.load_state_dict({k[len("lstm."):]: v for k, v in state.items() if k.startswith("lstm.")})
        self.linear.load_state_dict({k[len("linear."):]: v for k, v in state.items() if k.startswith("linear.")})
        self.lstm.to(device).eval()
        self.linear.to(device).eval()
        self.device = device

    def embed(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """Each clip's (P, 160, 40) partials -> its utterance embedding: the normed mean of the
        partials' normed embeddings. All partials of the batch run in one LSTM call."""
        import torch

        counts = [len(p) for p in clips]
        with torch.inference_mode():
            x = torch.from_numpy(np.concatenate(clips)).to(self.device)
            _, (hidden, _) = self.lstm(x)
            e = torch.relu(self.linear(hidden[-1]))
            e = (e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu().numpy()
        out, start = [], 0
        for n in counts:
            mean = e[start:start + n].mean(axis=0)
            out.append((mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32))
            start += n
        return out
