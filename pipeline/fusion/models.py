"""Fusion models over per-modality utterance vectors: ECMF's attention fusion and its baselines.

Every model takes `inputs` (store name -> (B, D_store) float tensor) and `mask` (B, M)
bool (True where the clip has that modality) and returns `(logits (B, 6), weights (B, M))`,
where `weights` are the modality weights the model used (uniform over present modalities
for models that have none), so reports and `mer predict` can show them for every kind.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import FusionConfig
from pipeline.errors import ConfigError

FUSION_MODELS: dict[str, type[nn.Module]] = {}  # train.model.kind -> model class; `single` is concat on one store


def register_fusion(kind: str):
    """Class decorator: the one place a fusion model is made known (params, `mer check`, ablation)."""
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if kind in FUSION_MODELS or kind == "single":
            raise ValueError(f"fusion kind {kind!r} registered twice")
        FUSION_MODELS[kind] = cls
        return cls
    return wrap


def fusion_kinds() -> list[str]:
    """Every value `train.model.kind` accepts."""
    return [*FUSION_MODELS, "single"]


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


class _Projector(nn.Module):
    """Per-modality input projection: LayerNorm, Linear to the common width, GELU, dropout."""

    def __init__(self, dims: dict[str, int], width: int, dropout: float):
        super().__init__()
        self.names = list(dims)
        self.proj = nn.ModuleDict({
            n: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, width), nn.GELU(), nn.Dropout(dropout))
            for n, d in dims.items()})

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.proj[n](inputs[n]) for n in self.names], dim=1)  # (B, M, W)


@register_fusion("ecmf")
class ECMFFusion(nn.Module):
    """Self-attention over modality tokens, a learned gate for dynamic modality weights,
    and a residual path that keeps the projected inputs (ECMF, MER2025-SEMI)."""

    def __init__(self, dims: dict[str, int], cfg: FusionConfig, n_classes: int = 6):
        super().__init__()
        self.project = _Projector(dims, cfg.width, cfg.dropout)
        self.modality_embedding = nn.Parameter(torch.zeros(len(dims), cfg.width))
        nn.init.normal_(self.modality_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, dim_feedforward=2 * cfg.width,
                                           dropout=cfg.dropout, batch_first=True, norm_first=True)
        self.attention = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.gate = nn.Sequential(nn.Linear(cfg.width, cfg.width // 2), nn.Tanh(), nn.Linear(cfg.width // 2, 1))
        self.classifier = nn.Sequential(nn.LayerNorm(cfg.width), nn.Dropout(cfg.dropout),
                                        nn.Linear(cfg.width, n_classes))

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        projected = self.project(inputs)  # (B, M, W)
        tokens = projected + self.modality_embedding
        # Missing modalities are masked out of attention, never zero-filled into it.
        attended = self.attention(tokens, src_key_padding_mask=~mask)
        fused_tokens = attended + projected  # residual: keep each projected input
        weights = _masked_softmax(self.gate(fused_tokens).squeeze(-1), mask)
        fused = (weights.unsqueeze(-1) * fused_tokens).sum(dim=1)
        return self.classifier(fused), weights


@register_fusion("mer_baseline")
class MERBaselineFusion(nn.Module):
    """The MER2025 official baseline: an MLP per modality, weights from a linear layer over
    their concatenation, weighted sum, classifier."""

    def __init__(self, dims: dict[str, int], cfg: FusionConfig, n_classes: int = 6):
        super().__init__()
        self.project = _Projector(dims, cfg.width, cfg.dropout)
        self.attention = nn.Linear(cfg.width * len(dims), len(dims))
        self.classifier = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.ReLU(), nn.Dropout(cfg.dropout),
                                        nn.Linear(cfg.width, n_classes))

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.project(inputs) * mask.unsqueeze(-1)  # (B, M, W), missing rows zero
        weights = _masked_softmax(self.attention(hidden.flatten(1)), mask)
        return self.classifier((weights.unsqueeze(-1) * hidden).sum(dim=1)), weights


@register_fusion("concat")
class ConcatFusion(nn.Module):
    """Plain concatenation of the projected modalities (zeros where missing) + MLP."""

    def __init__(self, dims: dict[str, int], cfg: FusionConfig, n_classes: int = 6):
        super().__init__()
        self.project = _Projector(dims, cfg.width, cfg.dropout)
        self.mlp = nn.Sequential(nn.Linear(cfg.width * len(dims), cfg.width), nn.ReLU(),
                                 nn.Dropout(cfg.dropout), nn.Linear(cfg.width, n_classes))

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.project(inputs) * mask.unsqueeze(-1)
        weights = mask.float() / mask.float().sum(dim=1, keepdim=True).clamp(min=1)
        return self.mlp(hidden.flatten(1)), weights


def build_fusion(dims: dict[str, int], cfg: FusionConfig, n_classes: int = 6) -> nn.Module:
    """The model named by `cfg.kind`; `single` keeps only `cfg.single` and uses the concat head."""
    check_kind(cfg.kind)
    if cfg.kind == "single":
        if cfg.single not in dims:
            raise ConfigError(f"params key 'train.model.single' is {cfg.single!r}; "
                              f"choose one of the stores in train.stores: {', '.join(dims)}")
        return ConcatFusion({cfg.single: dims[cfg.single]}, cfg, n_classes)
    return FUSION_MODELS[cfg.kind](dims, cfg, n_classes)


def check_kind(kind: str) -> None:
    if kind not in fusion_kinds():
        raise ConfigError(f"params key 'train.model.kind' is {kind!r}; allowed: {' | '.join(fusion_kinds())}")
