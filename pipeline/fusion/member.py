"""One fusion member's training (`train_fold`) and its answers (`predict`).

The trainer (train.py) calls `train_fold` for each ensemble member of each outer fold: a model
built from `train.model`, trained `train.epochs` epochs with AdamW on soft targets (class
weights, modality dropout), its inputs standardised on its own training rows. It is kept
apart from the cross-validation so that each reads in one sitting.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.devices import resolve_device
from pipeline.errors import TrainError
from pipeline.fusion.features import Features, Standardizer
from pipeline.fusion.models import build_fusion, inputs_normalized_once, set_dropout_generator
from pipeline.labels import EMOTIONS

_INIT_LOCK = threading.Lock()  # members built side by side take their initial weights from the global RNG in turn


def _set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="weighted", labels=list(range(len(EMOTIONS))), zero_division=0))


def train_fold(features: Features, train_rows: np.ndarray, train_targets: np.ndarray, val_rows: np.ndarray,
               val_gold: np.ndarray, cfg: TrainConfig, seed: int, fold: int = 0, choose: bool = True) -> dict:
    """Train one model on `train_rows` for `cfg.epochs` epochs. `choose`: keep the epoch with the
    best weighted F1 on `val_rows` (the inner validation split: never the clips the model is
    scored on); otherwise the last epoch stays and `val_rows`, when given, are only watched (the
    per-epoch history). Returns the model, its normaliser, the kept epoch and its score, and
    the per-epoch history."""
    device = train_device(cfg.device)
    norm = Standardizer(features, train_rows)
    dims = {s: features.inputs[s].shape[1] for s in features.stores}
    with _INIT_LOCK:
        _set_seed(seed)
        model = build_fusion(dims, cfg.model).to(device)
    set_dropout_generator(model, torch.Generator(device=device).manual_seed(seed + 7919))
    # fused: one kernel for all ~40 small tensors instead of a Python loop; on 2 CPU cores the
    # step was a quarter of a fold's time (23.7 s -> 19.3 s per fold, 2 text stores, 3,133 clips)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=torch.device(device).type in ("cpu", "cuda"))
    counts = np.bincount(train_targets.argmax(1), minlength=len(EMOTIONS)).astype(np.float32)
    class_weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(EMOTIONS))
    loss_weight = class_weight.to(device) if cfg.class_balance == "weights" else None
    x_train = {k: v.to(device) for k, v in norm(features, train_rows).items()}
    m_train = torch.from_numpy(features.mask[train_rows])
    x_val, m_val = norm(features, val_rows), torch.from_numpy(features.mask[val_rows])
    y_train = torch.from_numpy(train_targets.astype(np.float32)).to(device)
    generator = torch.Generator().manual_seed(seed)
    mixup_rng = np.random.default_rng(seed)  # the member's own stream: side by side, members never share one
    best = {"val_f1": -1.0, "epoch": -1, "state": None}
    history = []
    with inputs_normalized_once(model, x_train, x_val) as (x_train, x_val):
        for epoch in range(cfg.epochs):
            model.train()
            order = _epoch_order(train_targets, class_weight, cfg.class_balance, generator)
            total = 0.0
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                # index_select, not v[idx]: the same rows, in a fifth of the time on the CPU (five
                # video stores, batch 64: 0.14 ms against 0.75 ms, 5% of a step)
                on_device = idx.to(device)
                batch = {k: torch.index_select(v, 0, on_device) for k, v in x_train.items()}
                targets = torch.index_select(y_train, 0, on_device)
                mask = m_train[idx]
                if cfg.mixup > 0:  # before modality dropout, which then hides a modality of the blend
                    batch, targets, mask = _mixup(batch, targets, mask, cfg.mixup, mixup_rng, generator)
                mask = _drop_modalities(mask, cfg.model.modality_dropout, generator).to(device)
                logits, _ = model(batch, mask)
                loss = _soft_cross_entropy(logits, targets, loss_weight)
                if not torch.isfinite(loss):
                    raise TrainError(
                        f"fold {fold}, epoch {epoch}: the training loss is {float(loss)}; likely cause: "
                        f"params key 'train.lr' ({cfg.lr}) too high for these features, or a store with extreme "
                        "values (check `mer store-info`); lower train.lr or re-extract that store")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            if not len(val_rows):  # a refit for a fixed number of epochs: nothing to watch, the last one stays
                best = {"val_f1": -1.0, "epoch": epoch, "state": None}
                continue
            val_probs, _ = predict(model, x_val, m_val)
            val_f1 = weighted_f1(val_gold, val_probs.argmax(1))
            history.append({"epoch": epoch, "train_loss": total / len(order), "val_weighted_f1": val_f1})
            if not choose:  # watched only: the last epoch stays
                best = {"val_f1": val_f1, "epoch": epoch, "state": None}
            elif val_f1 > best["val_f1"]:
                best = {"val_f1": val_f1, "epoch": epoch,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return {"model": model.cpu(), "optimizer": optimizer, "norm": norm, "history": history, **best}


def train_device(requested: str) -> str:
    """`train.device` resolved (pipeline.devices): cuda without a GPU is an error, never a fallback."""
    return resolve_device(requested, "train.device")


def _epoch_order(targets: np.ndarray, class_weight: torch.Tensor, balance: str,
                 generator: torch.Generator) -> torch.Tensor:
    if balance == "sampler":  # balanced sampling: draw clips with probability ~ 1/class size
        weights = class_weight[torch.from_numpy(targets.argmax(1))]
        return torch.multinomial(weights, len(targets), replacement=True, generator=generator)
    return torch.randperm(len(targets), generator=generator)


def _drop_modalities(mask: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Hide modalities at random so the model learns to answer without them; keep >= 1 per clip."""
    if p <= 0:
        return mask
    keep = torch.rand(mask.shape, generator=generator) >= p
    dropped = mask & keep
    empty = ~dropped.any(dim=1)
    dropped[empty] = mask[empty]
    return dropped


def _mixup(inputs: dict[str, torch.Tensor], targets: torch.Tensor, mask: torch.Tensor, alpha: float,
           rng: np.random.Generator, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """mixup (Zhang et al., ICLR 2018): each clip of the batch blended with another of it, every
    store's input and the soft target alike, by one coefficient drawn from Beta(alpha, alpha) and
    folded to 0.5 or more, so each row stays mostly its own clip. The inputs are blended as the
    projector's first Linear sees them: standardised, then its parameter-free LayerNorm
    (`inputs_normalized_once`), not normalised again after. A modality either clip has is
    present in the blend (a missing one blends as its zeros); `mask` is the clips' own, before
    modality dropout. Off by default: over ten fold seeds it ties by CV (README "Fusion": mixup)."""
    share = float(rng.beta(alpha, alpha))
    share = max(share, 1.0 - share)
    partner = torch.randperm(len(targets), generator=generator)  # on the CPU, as the mask
    on_device = partner.to(targets.device)
    mixed = {k: torch.lerp(v.index_select(0, on_device), v, share) for k, v in inputs.items()}
    return mixed, torch.lerp(targets.index_select(0, on_device), targets, share), mask | mask[partner]


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    log_probs = torch.log_softmax(logits, dim=1)
    per_class = -targets * log_probs
    if weight is not None:
        per_class = per_class * weight
    return per_class.sum(dim=1).mean()


@torch.inference_mode()
def predict(model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, 6) and modality weights (N, M) on the CPU. Every clip must have
    at least one modality: a clip with none has nothing to attend to (callers give it the prior)."""
    if len(mask) and not mask.any(dim=1).all():
        raise TrainError("predict() was given clips without any modality; give them the training prior")
    model.eval()
    device = next(model.parameters()).device
    logits, weights = model({k: v.to(device) for k, v in inputs.items()}, mask.to(device))
    return torch.softmax(logits, dim=1).cpu().numpy(), weights.cpu().numpy()
