"""The `train` section of `params.yaml` (pipeline/fusion/train.py): the fusion model and its trainer.

Its own module so that the package's `__init__`, which every stage imports, stays under the
400-line limit as sections grow; `from pipeline.config import TrainConfig` is the import to use. Loading rejects unknown keys
and wrong types as every section does (pipeline/schema.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.devices import is_device
from pipeline.schema import _at_least, _fraction, _one_of, check_values

CLASS_BALANCE = ("weights", "sampler", "none")
EPOCH_CHOICE = ("fixed", "inner_split")
SPEAKER_NORM = ("auto", "on", "off")


@dataclass(frozen=True)
class FusionConfig:
    kind: str = "ecmf"  # ecmf | mer_baseline | concat | single: the fusion registry (pipeline/fusion/models.py)
    width: int = 64  # common width every modality is projected to (README "Fusion": 64 measured as high as 128)
    depth: int = 1  # self-attention layers over the modality tokens
    heads: int = 4
    dropout: float = 0.3
    modality_dropout: float = 0.15  # chance, per clip and modality, to hide it while training
    single: str = ""  # the store used when kind is "single"

    def __post_init__(self) -> None:
        check_values("train.model", [
            _at_least("width", self.width, 2),
            _at_least("depth", self.depth, 1),
            ("heads", self.heads, self.heads >= 1 and self.width % self.heads == 0,
             f"1 or more, dividing train.model.width ({self.width})"),
            ("dropout", self.dropout, 0.0 <= self.dropout < 1.0, "a number in [0, 1)"),
            ("modality_dropout", self.modality_dropout, 0.0 <= self.modality_dropout < 1.0, "a number in [0, 1)"),
            ("single", self.single, self.kind != "single" or bool(self.single),
             "a store of train.stores when train.model.kind is single"),
        ])


@dataclass(frozen=True)
class TrainConfig:
    stores: list[str] = field(default_factory=lambda: ["prosody"])  # features/<store>.h5, key utterance
    model: FusionConfig = field(default_factory=FusionConfig)
    folds: int = 5
    seed: int = 0
    epochs: int = 40  # epoch_choice fixed: the epochs trained; inner_split: the most tried
    epoch_choice: str = "fixed"  # fixed | inner_split (best weighted F1 on an inner split of each training fold)
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    class_balance: str = "weights"  # weights | sampler | none
    speaker_norm: str = "auto"  # auto | on | off: each store standardised per speaker (group); pipeline/fusion/features.py
    speaker_stores: list[str] = field(default_factory=list)  # [] or one voice store: pseudo-speakers when none is named
    use_refined: bool = False  # train on refined labels of labelled clips (reports/refine/labels.jsonl)
    use_pseudo: bool = False  # add pseudo-labelled clips to every training fold
    refine_in_folds: bool = True  # use_refined / use_pseudo: refine again inside each training fold (honest CV)
    refit: bool = True  # inner_split: after choosing the epoch there, retrain on the whole training fold
    ensemble: int = 1  # models per outer fold, each with its own seed; their probabilities are averaged
    linear_weight: float = 0.0  # share of each fold's answer from its linear member (pipeline/fusion/linear.py); 0: none
    linear_c: float = 0.005  # that member's inverse L2 strength on the standardised stores (scikit-learn's C)
    screen_stores: bool = False  # per training fold, mask stores that predict no better than the class frequencies
                                 # (pipeline/fusion/screen.py)
    self_training: bool = False  # per outer fold, a teacher's confident answers on the clips it predicts (its
    self_training_threshold: float = 0.7  # scored clips, labels unread, and the candidates) train as pseudo-labels
    self_training_teacher: str = "linear"  # linear: the fold's linear member, fitted first on its labelled clips | fold: its models
    self_training_min_clips: int = 150  # a fold with fewer labelled training clips does not self-train
    self_training_max_ratio: float = 1.0  # pseudo-labels per labelled training clip at most, each class its share; 0: no cap
    mixup: float = 0.0  # mixup's Beta(alpha, alpha) for the fusion members' batches (pipeline/fusion/member.py); 0: off
    device: str = "cpu"
    threads: int = 2  # CPU threads: up to this many ensemble members train side by side, one thread each (the
                      # model is tiny: one thread per model is fastest); the result does not depend on it

    def __post_init__(self) -> None:
        check_values("train", [
            ("stores", self.stores, bool(self.stores) and len(set(self.stores)) == len(self.stores),
             "a non-empty list of store names, each once"),
            ("model.single", self.model.single, self.model.kind != "single" or self.model.single in self.stores,
             f"one of train.stores ({', '.join(self.stores)}) when train.model.kind is single"),
            _at_least("folds", self.folds, 2),
            _at_least("epochs", self.epochs, 1),
            _one_of("epoch_choice", self.epoch_choice, EPOCH_CHOICE),
            _at_least("ensemble", self.ensemble, 1),
            ("linear_weight", self.linear_weight, 0.0 <= self.linear_weight < 1.0, "a number in [0, 1)"),
            ("linear_c", self.linear_c, self.linear_c > 0, "a number above 0"),
            _fraction("self_training_threshold", self.self_training_threshold),
            _one_of("self_training_teacher", self.self_training_teacher, ("linear", "fold")),
            _at_least("self_training_min_clips", self.self_training_min_clips, 0),
            ("self_training_max_ratio", self.self_training_max_ratio, self.self_training_max_ratio >= 0, "0 (no cap) or more"),
            ("mixup", self.mixup, 0 <= self.mixup < float("inf"), "0 (off) or a finite Beta parameter above 0, e.g. 1.0"),
            _at_least("batch_size", self.batch_size, 1),
            ("lr", self.lr, self.lr > 0, "a number above 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, "0 or more"),
            _one_of("class_balance", self.class_balance, CLASS_BALANCE),
            _one_of("speaker_norm", self.speaker_norm, SPEAKER_NORM),
            ("speaker_stores", self.speaker_stores, len(self.speaker_stores) <= 1,
             "[] or one store holding voice embeddings (extractor voice_encoder), e.g. [speaker]"),
            ("device", self.device, is_device(self.device), "auto | cpu | cuda | cuda:N"),
            _at_least("threads", self.threads, 1),
        ])
