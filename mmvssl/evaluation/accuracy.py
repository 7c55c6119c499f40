"""Classification metrics from class scores: top-k accuracy, mean per-class accuracy, confusion
matrix, and the chance level of each (a uniform random guess)."""

from __future__ import annotations

import torch

from .metrics import TIE_TOLERANCE


def topk_correct(scores: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C) scores, (N,) class indices -> (N,) bool: the target is among the k best scores.

    Ties count against the model: a target tied with the k-th best is only in when fewer than k
    other classes score at least as high (within metrics.TIE_TOLERANCE)."""
    target_score = scores.gather(1, targets[:, None])  # (N, 1)
    others_ahead = (scores >= target_score - TIE_TOLERANCE).sum(dim=1) - 1
    return others_ahead < k


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_metrics(scores: torch.Tensor, targets: torch.Tensor, num_classes: int | None = None) -> dict:
    """top1, top5, mean per-class accuracy (percent) with their chance levels, and the confusion
    matrix. Classes absent from `targets` are left out of the per-class mean."""
    if scores.ndim != 2 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} do not match targets {tuple(targets.shape)}")
    num_classes = num_classes or scores.shape[1]
    targets = targets.long()
    # pessimistic on ties, like topk_correct: the prediction is the target only when it wins alone
    top1 = topk_correct(scores, targets, 1)
    predictions = scores.argmax(dim=1)
    predictions = torch.where(top1, targets, torch.where(predictions == targets, (targets + 1) % num_classes,
                                                         predictions))
    confusion = confusion_matrix(predictions, targets, num_classes)
    support = confusion.sum(dim=1)
    present = support > 0
    per_class = confusion.diag()[present].double() / support[present]
    k5 = min(5, num_classes)
    return {
        "top1": 100.0 * top1.double().mean().item(),
        "top5": 100.0 * topk_correct(scores, targets, k5).double().mean().item(),
        "mean_class_acc": 100.0 * per_class.mean().item(),
        "chance_top1": 100.0 / num_classes,
        "chance_top5": 100.0 * k5 / num_classes,
        "num_samples": int(targets.shape[0]),
        "num_classes": int(num_classes),
        "confusion": confusion.tolist(),
    }
