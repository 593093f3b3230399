"""Typed, strict view of `params.yaml`: one dataclass per section.

Loading rejects unknown keys and wrong types with the dotted key in the message, so a
typo in `params.yaml` fails before any work instead of being silently ignored.
`params.yaml` is the only source of truth; there is no second config system.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params value is missing, unknown or of the wrong type; the message names the key."""


@dataclass(frozen=True)
class IngestConfig:
    root: str = "data/demo"  # dataset root in the MER2025 layout
    video_dir: str = "video"
    audio_dir: str = "audio"
    face_dir: str = "openface_face"
    subtitle_file: str = "subtitle_chieng.csv"
    label_file: str = "track1_train_disdim.csv"
    candidate_file: str = "track_all_candidates.csv"


RUNNERS = ("local", "ray")


@dataclass(frozen=True)
class EngineConfig:
    """How extraction runs; none of these change the values written."""

    device: str = "auto"  # auto | cpu | cuda
    batch_size: int = 8  # clips per model call
    decode_workers: int = 2  # background threads decoding media
    decoder_threads: int = 0  # FFmpeg threads per decoding clip; 0: the CPUs shared out, cpus // decode_workers
    flush_every: int = 16  # clips buffered before a segment is committed to disk
    flush_seconds: float = 30.0  # ...or this many seconds, whichever comes first
    max_failed_fraction: float = 0.1  # the stage fails above this fraction of failed clips
    # Where `extract` runs (issue #8's `extract.engine`; it lives here because `extract` maps store
    # names). Same extractor, params and store either way; see pipeline/extract_ray.py.
    runner: str = "local"  # local | ray
    ray_address: str | None = None  # a running cluster ("auto", "host:6379"); None: a local Ray for the run
    ray_workers: int = 0  # actors, each with one loaded model; 0: one per GPU (cuda) or per CPU slot
    ray_cpus_per_worker: float = 1.0  # CPUs each actor reserves (and its torch/OpenMP thread count)
    ray_batches_per_shard: int = 4  # a shard (one actor call, the unit of retry) is at most this many batches

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ConfigError(f"params key 'engine.runner' is {self.runner!r}; use {' or '.join(RUNNERS)}")
        if self.decoder_threads < 0:
            raise ConfigError(f"params key 'engine.decoder_threads' is {self.decoder_threads}; use 0 (auto) or more")
        if self.ray_workers < 0:
            raise ConfigError(f"params key 'engine.ray_workers' is {self.ray_workers}; use 0 (auto) or more")
        if self.ray_batches_per_shard < 1:
            raise ConfigError(f"params key 'engine.ray_batches_per_shard' is {self.ray_batches_per_shard}; "
                              "use 1 or more")
        if self.ray_cpus_per_worker <= 0:
            raise ConfigError(f"params key 'engine.ray_cpus_per_worker' is {self.ray_cpus_per_worker}; "
                              "it must be above 0")


@dataclass(frozen=True)
class ExtractorSpec:
    """One feature store: `extract.<store name>` in params."""

    extractor: str  # registry name, see `mer extractors`
    options: dict[str, Any] = field(default_factory=dict)  # checked by the extractor's own Options


@dataclass(frozen=True)
class FusionConfig:
    kind: str = "ecmf"  # ecmf | mer_baseline | concat | single
    width: int = 128  # common width every modality is projected to
    depth: int = 1  # self-attention layers over the modality tokens
    heads: int = 4
    dropout: float = 0.3
    modality_dropout: float = 0.15  # chance, per clip and modality, to hide it while training
    single: str = ""  # the store used when kind is "single"


@dataclass(frozen=True)
class TrainConfig:
    stores: list[str] = field(default_factory=lambda: ["prosody"])  # features/<store>.h5, key utterance
    model: FusionConfig = field(default_factory=FusionConfig)
    folds: int = 5
    seed: int = 0
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    class_balance: str = "weights"  # weights | sampler | none
    use_refined: bool = False  # train on refined labels of labelled clips (reports/refine/labels.jsonl)
    use_pseudo: bool = False  # add pseudo-labelled clips to every training fold
    device: str = "cpu"
    threads: int = 1  # the fusion model is tiny: one CPU thread is fastest and reproducible


@dataclass(frozen=True)
class Params:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    extract: dict[str, ExtractorSpec] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Sections validated strictly by their own stage (dataclasses in pipeline/refine.py, pipeline/llm.py):
    refine: dict[str, Any] = field(default_factory=dict)
    llm: dict[str, Any] = field(default_factory=dict)
    enriched_text: dict[str, Any] = field(default_factory=dict)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"params key '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(hint, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"params key '{key}' must be a mapping, got {type(value).__name__}")
        _, value_hint = typing.get_args(hint)
        return {str(k): _check_type(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"params key '{key}' must be a list, got {type(value).__name__}")
        (item_hint,) = typing.get_args(hint)
        return [_check_type(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _check_type(value, arg, key)
                except ConfigError:
                    continue
        raise ConfigError(f"params key '{key}' has value {value!r}, expected {hint}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(
            f"params key '{key}' must be {hint.__name__}, got {type(value).__name__} ({value!r})"
        )
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown params key(s) {', '.join(repr(f'{prefix}.{k}'.lstrip('.')) for k in unknown)} "
            f"in {where}; known keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}".lstrip(".")
        if f.name in data:
            kwargs[f.name] = _check_type(data[f.name], hints[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"params key '{key}' is required")
    return cls(**kwargs)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate `params.yaml`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the repository root or pass --params")
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return from_dict(Params, data)


def as_dict(obj: Any) -> Any:
    """Plain-JSON form of a config dataclass (for fingerprints and reports)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def store_spec(params: Params, store: str, section: str = "extract") -> ExtractorSpec:
    """The extractor spec of a store: `extract.<store>`, or a single-store section (`enriched_text`)."""
    if section == "extract":
        if store not in params.extract:
            raise ConfigError(f"no store {store!r} under params key 'extract'; "
                              f"known: {', '.join(sorted(params.extract)) or 'none'}")
        return params.extract[store]
    single = {"enriched_text": params.enriched_text}
    if section not in single:
        raise ConfigError(f"section {section!r}: use extract or one of {', '.join(single)}")
    if not single[section]:
        raise ConfigError(f"params key {section!r} is empty; give it an extractor and its options")
    return from_dict(ExtractorSpec, single[section], section)
