"""Retrieval metrics from a similarity matrix and a relevance matrix.

The rank of a query is the rank of its best relevant item, counted pessimistically: every
non-relevant item scoring at least as high comes first, so a collapsed model (all scores
equal) gets the worst rank, never a flattering one.

Ties: scores within TIE_TOLERANCE of each other are equal here (and in `mmvssl search`'s ranking
and classification's top-k). Cosine similarities of the same unit vectors computed by another BLAS
kernel, thread count or CPU differ in their last float32 bits (summation order: ~1e-7 at D = 512,
rarely past 1e-6); 1e-5 leaves a margin and is far below any difference a ranking should act on.
"""

from __future__ import annotations

import torch

TIE_TOLERANCE = 1e-5  # scores this close are a tie (see the module docstring)


def query_ranks(similarity: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """similarity (Q, N), relevant (Q, N) bool with at least one True per row -> ranks (Q,), 1-based."""
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and relevance {tuple(relevant.shape)} differ in shape")
    if not bool(relevant.any(dim=1).all()):
        raise ValueError("every query needs at least one relevant item")
    best = similarity.masked_fill(~relevant, float("-inf")).max(dim=1).values  # (Q,)
    ahead = ((similarity >= best[:, None] - TIE_TOLERANCE) & ~relevant).sum(dim=1)  # non-relevant at or above (ties)
    return ahead + 1


def retrieval_metrics(similarity: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """R@K (percent), median and mean rank, and the chance R@1 (percent) for these relevance sets."""
    ranks = query_ranks(similarity.float(), relevant.bool()).float()
    out = {f"R@{k}": 100.0 * (ranks <= k).float().mean().item() for k in ks}
    out["MedR"] = torch.quantile(ranks, 0.5).item()  # as numpy.median: mean of the middle two
    out["MeanR"] = ranks.mean().item()
    out["chance_R@1"] = 100.0 * (relevant.float().sum(dim=1) / relevant.shape[1]).mean().item()
    for k in ks:
        if k != 1:
            out[f"chance_R@{k}"] = chance_recall_at(relevant, k)
    out["num_queries"] = int(relevant.shape[0])
    out["num_items"] = int(relevant.shape[1])
    return out


def chance_recall_at(relevant: torch.Tensor, k: int) -> float:
    """R@K (percent) of a uniformly random ranking: 1 - P(no relevant item among the first K),
    P = prod_{i<K} (N - r - i) / (N - i) for a query with r relevant among N."""
    n = relevant.shape[1]
    r = relevant.double().sum(dim=1)  # (Q,)
    i = torch.arange(min(k, n), dtype=torch.double)
    miss = ((n - r[:, None] - i).clamp_min(0) / (n - i)).prod(dim=1)
    return 100.0 * (1 - miss).mean().item()
