"""Linear probe: multinomial logistic regression on frozen features.

Features are standardised with the training set's mean and deviation; the weight decay is chosen
from a small sweep on a held-out part of the training set (stratified, seeded), then the probe is
refit on all of the training set and scored once on the test set. Written with torch (full-batch
L-BFGS, a convex problem) because scikit-learn is not a dependency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .accuracy import classification_metrics

WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                 max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + weight_decay / 2 * |W|^2 -> (W (C, D), b (C,))."""
    x, y = x.double(), y.long()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.double, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def holdout_split(y: torch.Tensor, fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held_out): `fraction` of each class held out (at least one where a class has
    two or more). One seeded permutation of all samples, so the split does not depend on class order."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    fit, held = [], []
    for c in torch.unique(y):
        idx = perm[y[perm] == c]
        n = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.append(idx[:n])
        fit.append(idx[n:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


class Standardise:
    def __init__(self, x: torch.Tensor):
        self.mean = x.double().mean(dim=0)
        self.std = x.double().std(dim=0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones(x.shape[1], dtype=torch.double)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) / self.std


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 num_classes: int, weight_decays=WEIGHT_DECAYS, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Sweep weight decay on a held-out 20% of train, refit on all of train, score test."""
    train_labels = train_labels.long()
    fit, held = holdout_split(train_labels, 0.2, seed)
    sweep = {}
    if len(held):
        norm = Standardise(train[fit])
        for wd in weight_decays:
            w, b = fit_logistic(norm(train[fit]), train_labels[fit], num_classes, wd)
            scores = norm(train[held]) @ w.T + b
            sweep[wd] = classification_metrics(scores, train_labels[held], num_classes)["top1"]
    best = max(sweep, key=lambda wd: (sweep[wd], wd)) if sweep else weight_decays[-1]  # ties: stronger decay
    norm = Standardise(train)
    w, b = fit_logistic(norm(train), train_labels, num_classes, best)
    scores = norm(test) @ w.T + b
    metrics = classification_metrics(scores, test_labels, num_classes)
    metrics.update(weight_decay=best, sweep_heldout_top1={str(k): v for k, v in sweep.items()},
                   train_top1=classification_metrics(norm(train) @ w.T + b, train_labels, num_classes)["top1"])
    return metrics, scores.float()
