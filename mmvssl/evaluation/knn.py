"""Weighted k-nearest-neighbour classification on frozen features (InstDisc, Wu et al. 2018;
DINO's eval_knn): cosine similarity to every training sample, the k nearest vote for their class
with weight exp(similarity / T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .accuracy import classification_metrics


@torch.no_grad()
def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """(N_test, C) class votes from the k most similar training samples."""
    train = F.normalize(train.float(), dim=-1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], chunk):
        sim = F.normalize(test[start:start + chunk].float(), dim=-1) @ train.T  # (b, N_train)
        top, idx = sim.topk(k, dim=1)  # (b, k)
        weights = (top / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], weights)
        out.append(votes)
    return torch.cat(out)


def knn_classify(train, train_labels, test, test_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> tuple[dict, torch.Tensor]:
    scores = knn_scores(train, train_labels.long(), test, num_classes, k, temperature)
    metrics = classification_metrics(scores, test_labels, num_classes)
    metrics.update(k=min(k, train.shape[0]), temperature=temperature)
    return metrics, scores
