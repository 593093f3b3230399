"""Fusion models over per-modality utterance vectors: ECMF's attention fusion and its baselines.

Every model takes `inputs` (store name -> (B, D_store) float tensor) and `mask` (B, M)
bool (True where the clip has that modality) and returns `(logits (B, 6), weights (B, M))`,
where `weights` are the modality weights the model used (uniform over present modalities
for models that have none), so reports and `mer predict` can show them for every kind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


class FastDropout(nn.Module):
    """Inverted dropout drawn from 8 random bits per element instead of one Bernoulli draw each.

    On the CPU, torch's dropout costs about 10 ns per element (a Mersenne-Twister draw apiece):
    207 us for a (32, 5, 128) batch, a fifth of an ECMF training step. One 64-bit draw gives
    8 elements' bits here: 58 us for the same tensor (README "Fusion": measured). The drop
    probability is `p` rounded to 1/256 (0.3 -> 0.3008); kept values are scaled by the exact
    keep probability, so the expectation is unchanged."""

    def __init__(self, p: float):
        super().__init__()
        self.threshold = round(p * 256)  # a byte below this drops its element
        self.p = self.threshold / 256
        self.generator: torch.Generator | None = None  # None: torch's global one (set_dropout_generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, (-(-x.numel() // 8),), dtype=torch.int64, device=x.device,
                              generator=self.generator)
        bits = words.view(torch.uint8)[:x.numel()].view(x.shape)
        return x * ((bits >= self.threshold).to(x.dtype) * (1 / (1 - self.p)))

    def per_token(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` on (B, M, W) tokens with the bits drawn token after token: the very bits M
        dropouts, one on each token's (B, W), would draw one after another from the same generator,
        in one draw and one multiply instead of M of each."""
        if not self.training or self.threshold == 0:
            return x
        batch, tokens, width = x.shape
        per_token = -(-batch * width // 8)  # the 64-bit words one token's (B, W) draw takes
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, (tokens * per_token,), dtype=torch.int64, device=x.device,
                              generator=self.generator)
        bits = words.view(torch.uint8).view(tokens, -1)[:, :batch * width].reshape(tokens, batch, width)
        return x * ((bits.transpose(0, 1) >= self.threshold).to(x.dtype) * (1 / (1 - self.p)))


def set_dropout_generator(model: nn.Module, generator: torch.Generator) -> None:
    """Every dropout of `model` draws from `generator`: ensemble members training side by side
    (train.threads) then each get their own stream, and a run does not depend on their timing."""
    for module in model.modules():
        if isinstance(module, FastDropout):
            module.generator = generator


class _AttentionLayer(nn.Module):
    """One pre-norm transformer encoder layer over the modality tokens: what
    nn.TransformerEncoderLayer(norm_first=True, ReLU feed-forward of 2 x width) computes, written
    out so that attention is a few plain matmuls and dropout is FastDropout
    (an ECMF fold on five stores: README "Fusion", measured)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.feed_forward = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), FastDropout(dropout),
                                          nn.Linear(2 * width, width))
        self.drop_attention, self.drop1, self.drop2 = FastDropout(dropout), FastDropout(dropout), FastDropout(dropout)
        nn.init.xavier_uniform_(self.qkv.weight)  # nn.MultiheadAttention's initialisation
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        # a missing modality is never attended to; each clip has at least one present (train.py).
        # Plain matmuls: on these (B, heads, M, M) scores scaled_dot_product_attention's CPU kernel
        # took 4x their time
        scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        attention = _masked_softmax(scores, mask[:, None, None, :])
        attended = self.drop_attention(attention) @ v
        x = x + self.drop1(self.out(attended.transpose(1, 2).reshape(batch, tokens, width)))
        return x + self.drop2(self.feed_forward(self.norm2(x)))


class _Projector(nn.Module):
    """Per-modality input projection: LayerNorm, Linear to the common width, GELU, dropout.

    The LayerNorm has no affine of its own: the Linear after it absorbs a per-dimension scale
    and shift exactly (W diag(g) and W b + c), and without those parameters autograd needs no
    gradient with respect to the (B, D) inputs, a (B, 64) x (64, D) product per store and step.
    An ECMF step on the five video stores took 0.86x the time, with the same scores (README
    "Fusion": training speed). A checkpoint written with the earlier affine LayerNorm loads:
    its scale and shift are folded into the Linear (`_fold_affine`), which gives its outputs."""

    def __init__(self, dims: dict[str, int], width: int, dropout: float):
        super().__init__()
        self.names = list(dims)
        self.proj = nn.ModuleDict({
            n: nn.Sequential(nn.LayerNorm(d, elementwise_affine=False), nn.Linear(d, width), nn.GELU(),
                             FastDropout(dropout))
            for n, d in dims.items()})
        self.register_load_state_dict_pre_hook(self._fold_affine)
        self.inputs_normalized = False  # True only inside `inputs_normalized_once`

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # each store's LayerNorm (unless applied once per clip already) and Linear, then the GELU and
        # the dropout once over all tokens: the values and random bits of doing them store by store
        # (test), in fewer ops (an ECMF fold on the five video stores: 0.92x, README "Fusion")
        normalized = self.inputs_normalized  # the LayerNorm was applied to the whole store already
        linear = [self.proj[n][1](inputs[n] if normalized else self.proj[n][0](inputs[n])) for n in self.names]
        activation, dropout = self.proj[self.names[0]][2:]  # every store's are alike
        hidden = activation(torch.stack(linear, dim=1))  # (B, M, W)
        # (bench-train's reference row swaps in torch's dropout, which draws its own way)
        return dropout.per_token(hidden) if isinstance(dropout, FastDropout) else dropout(hidden)

    def parameter_free_norm(self) -> bool:
        """Whether each input LayerNorm has no parameters, so it can run once per clip."""
        return all(isinstance(p[0], nn.LayerNorm) and not p[0].elementwise_affine for p in self.proj.values())

    def _fold_affine(self, _module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
        """Load hook: an earlier checkpoint's LayerNorm scale g and shift b (either may be
        absent: LayerNorm(bias=False)) become the Linear's W diag(g) and W b + c."""
        for n in self.names:
            scale, shift = state_dict.pop(f"{prefix}proj.{n}.0.weight", None), state_dict.pop(f"{prefix}proj.{n}.0.bias", None)
            weight_key, bias_key = f"{prefix}proj.{n}.1.weight", f"{prefix}proj.{n}.1.bias"
            if shift is not None:  # before the scale: b is applied after LayerNorm's scale, so W (unscaled) maps it
                state_dict[bias_key] = state_dict[bias_key] + state_dict[weight_key] @ shift
            if scale is not None:
                state_dict[weight_key] = state_dict[weight_key] * scale


@contextlib.contextmanager
def inputs_normalized_once(model: nn.Module, *input_sets: dict[str, torch.Tensor]) -> Iterator[tuple[dict, ...]]:
    """`input_sets` with the model's input LayerNorm applied once to every row, while the model
    skips it: the same values (a row's LayerNorm does not depend on its batch; test), without
    redoing it each epoch on a (32, D) batch per store and step, 5% of an ECMF step on the five
    video stores. A model without the parameter-free projector gets its inputs as they are."""
    project = getattr(model, "project", None)
    if not isinstance(project, _Projector) or not project.parameter_free_norm():
        yield input_sets
        return
    with torch.no_grad():
        normalized = tuple({n: project.proj[n][0](x) if n in project.proj else x for n, x in inputs.items()}
                           for inputs in input_sets)
    project.inputs_normalized = True
    try:
        yield normalized
    finally:
        project.inputs_normalized = False


@register_fusion("ecmf")
class ECMFFusion(nn.Module):
    """Self-attention over modality tokens, a learned gate for dynamic modality weights,
    and a residual path that keeps the projected inputs (ECMF, MER2025-SEMI)."""

    def __init__(self, dims: dict[str, int], cfg: FusionConfig, n_classes: int = 6):
        super().__init__()
        self.project = _Projector(dims, cfg.width, cfg.dropout)
        self.modality_embedding = nn.Parameter(torch.zeros(len(dims), cfg.width))
        nn.init.normal_(self.modality_embedding, std=0.02)
        self.attention = nn.ModuleList(_AttentionLayer(cfg.width, cfg.heads, cfg.dropout) for _ in range(cfg.depth))
        self.gate = nn.Sequential(nn.Linear(cfg.width, cfg.width // 2), nn.Tanh(), nn.Linear(cfg.width // 2, 1))
        self.classifier = nn.Sequential(nn.LayerNorm(cfg.width), FastDropout(cfg.dropout),
                                        nn.Linear(cfg.width, n_classes))

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        projected = self.project(inputs)  # (B, M, W)
        tokens = projected + self.modality_embedding
        # Missing modalities are masked out of attention, never zero-filled into it.
        attended = tokens
        for layer in self.attention:
            attended = layer(attended, mask)
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
        self.classifier = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.ReLU(), FastDropout(cfg.dropout),
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
                                 FastDropout(cfg.dropout), nn.Linear(cfg.width, n_classes))

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
