"""The linear member of each fold: a strongly regularised multinomial logistic regression on
the standardised stores side by side, blended with the fusion members (`train.linear_weight`).

Why: on the held-out corpora the fusion head and a well-regularised linear model err on
different clips. Averaging the two (weight 0.5, C 0.005) scored, CV / held out, over fold
seeds 0–2: MELD text 0.588 / 0.549 against 0.565 / 0.544 for the fusion alone; RAVDESS
named 0.884 / 0.846 against 0.886 / 0.835; unnamed 0.829 / 0.847 against 0.824 / 0.827
(README "Fusion": the linear member). The regression is scikit-learn's (lbfgs); its
coefficients are copied into `LinearFusion`, a torch module with the fusion models'
interface, so checkpoints, `mer predict` and the averaging treat it like any member.

Targets: a soft target row (refinement's `soft` mode, pseudo-labels) trains as its argmax,
since scikit-learn's regression takes hard labels; rows of `refine.mode: drop` never reach
here (the trainer filters them). No class weighting: it is what was measured.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from pipeline.fusion.features import Features, Standardizer
from pipeline.refine.weak import one_blas_thread

ABSENT_CLASS_BIAS = -30.0  # a class the training fold never shows: probability ~1e-13, never NaN


class LinearFusion(nn.Module):
    """logits = bias + sum over present stores of W_s x_s (a missing store's standardised input
    is zero, so it adds nothing); the reported modality weights are uniform over present stores."""

    def __init__(self, dims: dict[str, int], n_classes: int = 6):
        super().__init__()
        self.stores = list(dims)
        self.linears = nn.ModuleDict({s: nn.Linear(d, n_classes, bias=False) for s, d in dims.items()})
        self.bias = nn.Parameter(torch.zeros(n_classes))

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.bias.expand(mask.shape[0], -1)
        for j, store in enumerate(self.stores):
            logits = logits + self.linears[store](inputs[store]) * mask[:, j:j + 1]
        weights = mask.float() / mask.float().sum(dim=1, keepdim=True).clamp(min=1)
        return logits, weights


def fit_linear(features: Features, rows: np.ndarray, targets: np.ndarray, c: float, seed: int,
               norm: Standardizer | None = None) -> dict:
    """The linear member on training `rows` (targets: (len(rows), 6) rows, argmax taken), in the
    member dict `train_fold` returns: model, its normaliser, no optimizer, no epochs. `norm`: a
    Standardizer already fitted on exactly these rows (a fusion member's), else one is fitted."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    norm = norm or Standardizer(features, rows)
    inputs = norm(features, rows)
    x = torch.cat([inputs[s] for s in features.stores], dim=1).numpy()
    y = targets.argmax(1)
    dims = {s: features.inputs[s].shape[1] for s in features.stores}
    model = LinearFusion(dims, targets.shape[1])
    coef = np.zeros((targets.shape[1], x.shape[1]), np.float32)
    bias = np.full(targets.shape[1], ABSENT_CLASS_BIAS, np.float32)
    classes = np.unique(y)
    if len(classes) == 1:  # one class in the fold: it is always the answer
        bias[classes[0]] = 0.0
    else:
        with warnings.catch_warnings(), one_blas_thread():  # lbfgs may stop at max_iter on a wide store: still usable
            warnings.filterwarnings("ignore", category=ConvergenceWarning)
            lr = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x, y)
        if len(classes) == 2:  # scikit-learn's binary form: one row for the second class
            coef[classes[1]], bias[classes[1]] = lr.coef_[0], lr.intercept_[0]
            coef[classes[0]], bias[classes[0]] = 0.0, 0.0
        else:
            coef[lr.classes_], bias[lr.classes_] = lr.coef_, lr.intercept_
    with torch.no_grad():
        start = 0
        for store in features.stores:
            width = dims[store]
            model.linears[store].weight.copy_(torch.from_numpy(coef[:, start:start + width]))
            start += width
        model.bias.copy_(torch.from_numpy(bias))
    return {"model": model.eval(), "linear": True, "optimizer": None, "norm": norm, "history": [], "epoch": -1, "val_f1": -1.0}
