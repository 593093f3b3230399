"""Cheap hand-crafted prosody: pitch (YIN), energy, zero-crossings, MFCC statistics.

No weights; a few milliseconds per clip. It gives every dataset a working audio store
from the first day and is a strong weak-labeller input for acted speech.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.extractors.base import Extractor, NotApplicable, register
from pipeline.manifest import Clip


@dataclass(frozen=True)
class ProsodyOptions:
    sample_rate: int = 16000
    hop_ms: float = 10.0
    pitch_frame_ms: float = 64.0  # yin needs at least two periods of the lowest pitch
    fmin: float = 65.0
    fmax: float = 400.0
    n_mfcc: int = 13
    voiced_db_below_peak: float = 30.0  # frames quieter than this under the loudest are unvoiced
    silence_dbfs: float = -60.0  # a clip whose peak is below this counts as silent (present=0)
    max_seconds: float = 120.0  # longer audio is cut, so memory stays flat

    def __post_init__(self) -> None:
        if min(self.sample_rate, self.n_mfcc) < 1 or min(self.hop_ms, self.pitch_frame_ms, self.max_seconds) <= 0:
            raise ValueError("numpy_prosody options sample_rate and n_mfcc must be >= 1, hop_ms, pitch_frame_ms and "
                             "max_seconds > 0")
        if not 0 < self.fmin < self.fmax:
            raise ValueError(f"numpy_prosody options need 0 < fmin < fmax, got {self.fmin} and {self.fmax}")


def _yin(frames: np.ndarray, sr: int, fmin: float, fmax: float, threshold: float = 0.15) -> np.ndarray:
    """YIN pitch (de Cheveigne & Kawahara 2002) per frame in numpy; 0 where no period is found.

    Written out instead of `librosa.yin`, whose numba kernel crashed (segfault) with a
    stale JIT cache here: a prosody store must not depend on a JIT cache's health.
    """
    n = frames.shape[1]
    lag_min, lag_max = max(2, int(sr / fmax)), min(n // 2, int(sr / fmin))
    spectrum = np.fft.rfft(frames, 2 * n, axis=1)
    acf = np.fft.irfft(spectrum * np.conj(spectrum), axis=1)[:, : lag_max + 1]
    energy = np.cumsum(np.pad(frames ** 2, ((0, 0), (1, 0))), axis=1)
    window = n - lag_max
    e0 = energy[:, window][:, None]
    lags = np.arange(lag_max + 1)
    e_lag = energy[:, lags + window] - energy[:, lags]
    diff = e0 + e_lag - 2 * acf  # approximation over the first n - lag_max samples
    cmnd = diff[:, 1:] * np.arange(1, lag_max + 1) / np.maximum(np.cumsum(diff[:, 1:], axis=1), 1e-12)
    cmnd = np.concatenate([np.ones((len(frames), 1)), cmnd], axis=1)
    # The pitch period is the first local minimum inside the first dip below the threshold.
    inner = cmnd[:, lag_min:lag_max]
    dip_min = (inner < threshold) & (cmnd[:, lag_min + 1:lag_max + 1] >= inner)
    found = dip_min.any(axis=1)
    lag = np.where(found, dip_min.argmax(axis=1) + lag_min, lag_min)
    rows = np.arange(len(frames))
    a, b, c = cmnd[rows, lag - 1], cmnd[rows, lag], cmnd[rows, np.minimum(lag + 1, lag_max)]
    curvature = a - 2 * b + c
    shift = np.where(curvature > 1e-12, 0.5 * (a - c) / np.where(curvature > 1e-12, curvature, 1), 0.0)
    f0 = np.where(found, sr / (lag + np.clip(shift, -1, 1)), 0.0)
    return f0


@register("numpy_prosody")
class ProsodyExtractor(Extractor):
    """Per frame: log2 pitch, voiced flag, RMS dB, zero-crossing rate, MFCCs; plus mean/std."""

    modality = "audio"
    Options = ProsodyOptions
    output_keys = ("utterance", "sequence", "present")
    sequence_keys = ("sequence",)
    packages = ("numpy", "librosa", "scipy", "av")

    def prepare(self, clip: Clip) -> dict[str, Any]:
        """Decoding and the features both: there is no model to batch, and numpy on one clip
        in each decode thread runs side by side where the engine's one model thread would
        take the clips in turn."""
        from pipeline.data.media import clip_audio

        if not clip.has_audio:
            raise NotApplicable(clip.name)
        audio = clip_audio(clip.audio, clip.video, self.options.sample_rate)
        return self._one(audio[: int(self.options.max_seconds * self.options.sample_rate)])

    def extract_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return items

    def _frames(self, audio: np.ndarray) -> np.ndarray:
        o, sr = self.options, self.options.sample_rate
        hop = int(sr * o.hop_ms / 1000)
        size = max(int(sr * o.pitch_frame_ms / 1000), int(2 * sr / o.fmin) + 1)
        y = np.pad(audio.astype(np.float64), (0, max(0, size - len(audio))))
        frames = np.lib.stride_tricks.sliding_window_view(y, size)[::hop]
        rms_db = 10 * np.log10(np.maximum((frames ** 2).mean(axis=1), 1e-12))
        zcr = (np.abs(np.diff(np.signbit(frames), axis=1)).mean(axis=1)).astype(np.float64)
        f0 = _yin(frames, sr, o.fmin, o.fmax)
        mfcc = self._mfcc(frames)
        loud = (rms_db > rms_db.max() - o.voiced_db_below_peak) & (rms_db > o.silence_dbfs)
        voiced = loud & (f0 > 0)
        log_f0 = np.where(voiced, np.log2(np.maximum(f0, 1.0)), 0.0)
        return np.column_stack([log_f0, voiced, rms_db, zcr, mfcc]).astype(np.float32)

    def _mfcc(self, frames: np.ndarray) -> np.ndarray:
        import librosa.filters  # pure numpy; librosa's numba kernels are never called
        from scipy.fft import dct, rfft

        n_fft = frames.shape[1]
        power = np.abs(rfft(frames * np.hanning(n_fft), axis=1)) ** 2
        mel = librosa.filters.mel(sr=self.options.sample_rate, n_fft=n_fft, n_mels=40)
        log_mel = np.log(np.maximum(power @ mel.T, 1e-10))
        return dct(log_mel, type=2, norm="ortho", axis=1)[:, : self.options.n_mfcc]

    def _one(self, audio: np.ndarray) -> dict[str, Any]:
        seq = self._frames(audio)
        voiced = seq[:, 1] > 0
        pitch = seq[voiced, 0] if voiced.any() else np.zeros(1, np.float32)
        rest = seq[:, 2:]
        utterance = np.concatenate([
            [pitch.mean(), pitch.std(), voiced.mean(), len(audio) / self.options.sample_rate],
            rest.mean(axis=0), rest.std(axis=0),
        ]).astype(np.float32)
        peak_db = 20 * np.log10(max(float(np.abs(audio).max(initial=0.0)), 1e-9))
        present = np.float32(peak_db > self.options.silence_dbfs)
        return {"utterance": utterance, "sequence": seq, "present": present}
