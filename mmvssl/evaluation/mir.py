"""EPIC-KITCHENS-100 multi-instance retrieval (MIR): mAP and nDCG from a relevancy matrix.

Definitions as in the EK-100 MIR challenge code that LaViLa uses (Wray et al.):
  - mAP counts an item as relevant when its relevancy is exactly 1 (same verb and noun classes);
    AP = sum over ranks k of precision@k * rel(k), divided by the number of relevant items.
  - nDCG uses the graded relevancy in [0, 1]; a query's DCG sums rel_i / log2(i + 1) over its
    first n_i retrieved items, n_i = number of items with relevancy > 0, and is divided by
    the DCG of the ideal order (IDCG).
  - Both are computed for video->text (rows) and text->video (columns) and averaged.

Ties in similarity are broken against the model (non-relevant, then less relevant, first), as in
metrics.query_ranks, so a collapsed model cannot score by luck of the sort order. Written here
rather than imported because the reference is a script, not a package; tests check it against an
independent loop-based implementation.
"""

from __future__ import annotations

import torch


def _ranked_relevancy(similarity: torch.Tensor, relevancy: torch.Tensor) -> torch.Tensor:
    """Each row's relevancies in retrieval order, ties broken pessimistically. (Q, N)"""
    if similarity.shape != relevancy.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and relevancy {tuple(relevancy.shape)} differ in shape")
    # sort by relevancy ascending first, then stably by similarity descending: among equal
    # scores the least relevant item comes first
    by_rel = torch.argsort(relevancy, dim=1, stable=True)
    sim_sorted = torch.gather(similarity, 1, by_rel)
    order = torch.gather(by_rel, 1, torch.argsort(-sim_sorted, dim=1, stable=True))
    return torch.gather(relevancy, 1, order)


def average_precision(similarity: torch.Tensor, relevancy: torch.Tensor) -> torch.Tensor:
    """Per-query AP (Q,) with relevant = (relevancy == 1); NaN for a query with no relevant item."""
    hits = (_ranked_relevancy(similarity.double(), relevancy.double()) == 1).double()  # (Q, N)
    precision = hits.cumsum(dim=1) / torch.arange(1, hits.shape[1] + 1, dtype=torch.double)
    return (precision * hits).sum(dim=1) / hits.sum(dim=1)


def ndcg(similarity: torch.Tensor, relevancy: torch.Tensor) -> torch.Tensor:
    """Per-query nDCG (Q,) on graded relevancy, cut at each query's number of relevant items."""
    rel = relevancy.double()
    ranked = _ranked_relevancy(similarity.double(), rel)  # (Q, N)
    ideal = rel.sort(dim=1, descending=True).values
    cutoff = ideal > 0  # first n_i positions
    discount = 1.0 / torch.log2(torch.arange(2, rel.shape[1] + 2, dtype=torch.double))
    dcg = (ranked * cutoff * discount).sum(dim=1)
    idcg = (ideal * cutoff * discount).sum(dim=1)
    return dcg / idcg


def expected_ap_random(relevancy: torch.Tensor) -> torch.Tensor:
    """Expected AP (Q,) of a uniformly random ranking: the chance level of mAP.

    With R relevant among N, item at rank k is relevant with probability R/N and then has on
    average (k-1)(R-1)/(N-1) relevant items above it, so E[AP] = 1/N sum_k (1 + (k-1)(R-1)/(N-1)) / k.
    """
    n = relevancy.shape[1]
    r = (relevancy == 1).double().sum(dim=1, keepdim=True)  # (Q, 1)
    k = torch.arange(1, n + 1, dtype=torch.double)
    frac = (r - 1) / max(n - 1, 1)
    expected = ((1 + (k - 1) * frac) / k).sum(dim=1) / n
    return expected.masked_fill(r[:, 0] == 0, float("nan"))


def expected_ndcg_random(relevancy: torch.Tensor) -> torch.Tensor:
    """Expected nDCG (Q,) of a random ranking: every position holds the row's mean relevancy."""
    rel = relevancy.double()
    ideal = rel.sort(dim=1, descending=True).values
    cutoff = ideal > 0
    discount = 1.0 / torch.log2(torch.arange(2, rel.shape[1] + 2, dtype=torch.double))
    return rel.mean(dim=1) * (cutoff * discount).sum(dim=1) / (ideal * cutoff * discount).sum(dim=1)


def _mean_over_valid(values: torch.Tensor) -> float:
    ok = ~torch.isnan(values)
    return float(values[ok].mean()) if bool(ok.any()) else float("nan")


def mir_metrics(similarity: torch.Tensor, relevancy: torch.Tensor) -> dict:
    """EK-100 MIR numbers in percent: mAP and nDCG for v2t (rows), t2v (columns) and their mean,
    each with its chance level. similarity, relevancy: (num_videos, num_texts)."""
    out = {}
    for name, fn, chance in (("mAP", average_precision, expected_ap_random),
                             ("nDCG", ndcg, expected_ndcg_random)):
        v2t = _mean_over_valid(fn(similarity, relevancy))
        t2v = _mean_over_valid(fn(similarity.T, relevancy.T))
        c_v2t = _mean_over_valid(chance(relevancy))
        c_t2v = _mean_over_valid(chance(relevancy.T))
        out[name] = {"v2t": 100 * v2t, "t2v": 100 * t2v, "avg": 100 * (v2t + t2v) / 2,
                     "chance_avg": 100 * (c_v2t + c_t2v) / 2}
    return out
