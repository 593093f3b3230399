"""Fusion training speed: seconds per outer fold on 3,000 clips, 2 CPU cores, against the
trainer as it was, run in this same process (these machines are noisy: read the ratios).

    python -m pipeline.bench.train_speed            (make bench-train)

The clips are synthetic (class means plus noise) with the widths of real stores, so the
cost is the real one and no extraction runs first:
- `video`: frames 1,280 + faces 1,415 + prosody 34 + whisper 2,048 + text 768 (the default
  stores on a MER-style video corpus);
- `subtitles + LLM`: text 768 + text_enriched 768 (a subtitle corpus with `llm.enabled`).
Each row is a full group 5-fold cross_validate with params.yaml's train section (`--params`;
2 members by default) and the row's changes, so a fold trains on 2,400 clips; every row
watches the scored fold's curve with the first member only, as the trainer does. Rows, each adding one change to the row above:
- `reference`: ECMF on torch's nn.TransformerEncoderLayer with nn.Dropout, width 128, the
  members one after the other on one thread (the trainer before this benchmark);
- `written-out layer`: the same model with ECMF's own layer and FastDropout (models.py);
- `+ members side by side`: train.threads 2;
- `+ width 64`;
- `+ the linear member`: train.linear_weight 0.5, the default (a logistic regression fitted
  per fold beside the two members, pipeline/fusion/linear.py);
- `+ store screening`: train.screen_stores, the default (per fold, three inner logistic
  regressions per store, pipeline/fusion/screen.py; every synthetic store carries signal, so
  all stay and the row is the screening's cost alone);
- `+ input LayerNorm without affine`: the default model (models.py `_Projector`); the rows
  above train the earlier projector, whose input LayerNorm had a scale and shift;
- `+ self-training`: train.self_training, the default (a logistic-regression teacher per fold;
  its confident answers on the clips the fold scores join the training rows; every synthetic
  clip is labelled, so the pool is the scored fold's 600 clips; a corpus with candidates adds them);
- `+ input LayerNorm once per clip` (models.py `inputs_normalized_once`): the rows above apply
  it per batch, as the trainer did before;
- `+ batch 64, lr 0.0015, 16 epochs`: the default trainer (params.yaml); the rows above train
  batches of 32 at lr 0.001 for 20 epochs;
- `concat`: the concatenation baseline with the defaults, for scale.
`--rows 0 8 9 10` times only those rows (each still with every change above it; the reference,
row 0, is always run: the ratios need it). Writes reports/bench/train_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import FusionConfig, load_params, train_config
from pipeline.fusion import models as models_module
from pipeline.fusion import member as member_module
from pipeline.fusion import train as train_module
from pipeline.fusion.features import Features
from pipeline.fusion.models import ECMFFusion, FastDropout, build_fusion
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip
from pipeline.tables import markdown_table, write_table

STORE_SETS = {
    "video": {"frames": 1280, "faces": 1415, "prosody": 34, "whisper": 2048, "text": 768},
    "subtitles + LLM": {"text": 768, "text_enriched": 768},
}


class _TorchLayerECMF(ECMFFusion):
    """ECMF as it was: torch's encoder layer and dropout (the reference row only)."""

    def __init__(self, dims: dict[str, int], cfg: FusionConfig, n_classes: int = 6):
        super().__init__(dims, cfg, n_classes)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, dim_feedforward=2 * cfg.width,
                                           dropout=cfg.dropout, batch_first=True, norm_first=True)
        encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.attention = nn.ModuleList([_PaddingMaskLayer(encoder)])
        for parent in self.modules():
            for name, child in parent.named_children():
                if isinstance(child, FastDropout):
                    setattr(parent, name, nn.Dropout(child.p))


class _PaddingMaskLayer(nn.Module):
    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=~mask)


class _EarlierProjector(models_module._Projector):
    """The input projection before `_Projector`'s LayerNorm lost its affine: the same, with a
    scale and shift on each input LayerNorm."""

    def __init__(self, dims: dict[str, int], width: int, dropout: float):
        super().__init__(dims, width, dropout)
        for layers in self.proj.values():
            layers[0] = nn.LayerNorm(layers[0].normalized_shape)


@contextlib.contextmanager
def _earlier_projector() -> Iterator[None]:
    """The fusion models built while this is open have the earlier projector."""
    current = models_module._Projector
    models_module._Projector = _EarlierProjector
    try:
        yield
    finally:
        models_module._Projector = current


@contextlib.contextmanager
def _torch_layer() -> Iterator[None]:
    """The trainer builds the reference ECMF while this is open."""
    def build(dims: dict[str, int], cfg: FusionConfig, n_classes: int = 6) -> nn.Module:
        return _TorchLayerECMF(dims, cfg, n_classes) if cfg.kind == "ecmf" else build_fusion(dims, cfg, n_classes)

    member_module.build_fusion = build
    try:
        yield
    finally:
        member_module.build_fusion = build_fusion


def synthetic(dims: dict[str, int], n: int, seed: int = 0) -> tuple[list[Clip], Features]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(EMOTIONS), n)
    inputs = {s: (rng.standard_normal((n, d)) + 0.3 * rng.standard_normal((len(EMOTIONS), d))[y]).astype(np.float32)
              for s, d in dims.items()}
    clips = [Clip(name=f"c{i}", label=EMOTIONS[y[i]], group=f"s{i % 40}") for i in range(n)]
    return clips, Features([c.name for c in clips], inputs, np.ones((n, len(dims)), bool), list(dims))


@contextlib.contextmanager
def _input_norm_per_batch() -> Iterator[None]:
    """The trainer applies the input LayerNorm per batch, as before `inputs_normalized_once`."""
    member_module.inputs_normalized_once = lambda _model, *inputs: contextlib.nullcontext(inputs)
    try:
        yield
    finally:
        member_module.inputs_normalized_once = models_module.inputs_normalized_once


# Each row changes the row before it: TrainConfig fields, `width` and `kind` of the model, and
# the three patches of the trainer as it was (`torch_layer`, `earlier_projector`, `norm_per_batch`).
BEFORE = {"threads": 1, "width": 128, "linear_weight": 0.0, "screen_stores": False, "self_training": False,
          "torch_layer": True, "earlier_projector": True, "norm_per_batch": True,
          "batch_size": 32, "lr": 1e-3, "epochs": 20}
VARIANTS = [
    ("reference: torch encoder layer + dropout, width 128, one thread", {}),
    ("written-out layer + FastDropout, width 128, one thread", {"torch_layer": False}),
    ("+ members side by side (train.threads 2), width 128", {"threads": 2}),
    ("+ width 64", {"width": 64}),
    ("+ the linear member (train.linear_weight 0.5)", {"linear_weight": 0.5}),
    ("+ store screening (train.screen_stores)", {"screen_stores": True}),
    ("+ input LayerNorm without affine", {"earlier_projector": False}),
    ("+ self-training (train.self_training)", {"self_training": True}),
    ("+ input LayerNorm once per clip, not per batch", {"norm_per_batch": False}),
    ("+ batch 64, lr 0.0015, 16 epochs: the default", {"batch_size": 64, "lr": 0.0015, "epochs": 16}),
    ("concat, defaults", {"kind": "concat"}),
]


def row_settings() -> Iterator[tuple[str, dict]]:
    """Each VARIANTS row's label and its whole setting: BEFORE with every change up to that row."""
    setting = {**BEFORE, "kind": "ecmf"}
    for label, change in VARIANTS:
        setting = {**setting, **change}
        yield label, setting


def run(clips: int, store_sets: list[str], only: list[int] | None = None,
        params: str | Path = "params.yaml") -> list[dict]:
    """The VARIANTS rows (`only`: these indices and the reference) on each store set.

    Every field a row does not set comes from `params`' train section, so the default row is the
    trainer `dvc repro` runs: its ensemble, thresholds, dropout and regularisers, not the
    dataclass defaults."""
    base = train_config(load_params(params))
    rows = []
    for name in store_sets:
        dims = STORE_SETS[name]
        clip_list, features = synthetic(dims, clips)
        reference = None
        for index, (label, setting) in enumerate(row_settings()):
            if only is not None and index and index not in only:
                continue
            cfg = replace(base, stores=list(dims), threads=setting["threads"], linear_weight=setting["linear_weight"],
                          screen_stores=setting["screen_stores"], self_training=setting["self_training"],
                          batch_size=setting["batch_size"], lr=setting["lr"], epochs=setting["epochs"],
                          model=replace(base.model, kind=setting["kind"], width=setting["width"]))
            with (_torch_layer() if setting["torch_layer"] else contextlib.nullcontext(),
                  _earlier_projector() if setting["earlier_projector"] else contextlib.nullcontext(),
                  _input_norm_per_batch() if setting["norm_per_batch"] else contextlib.nullcontext()):
                result = train_module.cross_validate(clip_list, features, cfg, quiet=True, fold_lines=False)
            seconds = float(np.mean(result.seconds_per_fold))
            reference = reference or seconds
            rows.append({"stores": name, "dims": sum(dims.values()), "clips": clips, "row": label,
                         "seconds_per_fold": round(seconds, 1), "ratio_to_reference": round(seconds / reference, 2),
                         "fold_seconds": [round(s, 1) for s in result.seconds_per_fold]})
            logging.info("%s", rows[-1])
    return rows


def to_markdown(rows: list[dict]) -> str:
    return markdown_table(["stores (input dims)", "clips", "row", "s per fold", "× reference"],
                          ([f"{r['stores']} ({r['dims']:,})", r["clips"], r["row"], f"{r['seconds_per_fold']:.1f}",
                            f"{r['ratio_to_reference']:.2f}"] for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.train_speed", description=__doc__)
    parser.add_argument("--clips", type=int, default=3000)
    parser.add_argument("--stores", nargs="+", default=list(STORE_SETS), choices=list(STORE_SETS))
    parser.add_argument("--rows", nargs="+", type=int, choices=range(len(VARIANTS)), metavar="N",
                        help="only these rows of VARIANTS (and the reference); default: every row")
    parser.add_argument("--params", default="params.yaml", help="the train section every row starts from")
    parser.add_argument("--out", default="reports/bench/train_speed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = run(args.clips, args.stores, args.rows, args.params)
    write_table(args.out, rows, to_markdown(rows))


if __name__ == "__main__":
    main()
