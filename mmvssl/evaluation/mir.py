"""EPIC-KITCHENS-100 multi-instance retrieval (MIR): mAP and nDCG from a relevancy matrix.

Definitions of the EK-100 MIR challenge code (Wray et al.) as LaViLa ships it
(lavila/utils/evaluation_ek100mir.py: `calculate_mAP`, `calculate_nDCG`), which every published
EK-100 MIR number uses (LaViLa's 36.1 mAP among them):
  - mAP: rank the items; at every rank k whose item has relevancy exactly 1, take the
    cumulative *graded* relevancy of the first k items divided by k; sum, and divide by the
    number of items with relevancy exactly 1. Partially relevant items (0 < r < 1) therefore
    raise the precision of the exact matches ranked after them, but never count as hits.
  - nDCG: graded relevancy; a query's DCG sums rel_i / log2(i + 1) over its first n_i retrieved
    items, n_i = number of items with relevancy > 0, divided by the DCG of the ideal order.
  - Both for video->text (rows) and text->video (the transposed matrices), and their mean.

Where mmvssl departs from the reference, on purpose:
  - Ties. The reference orders items with numpy's default (unstable) argsort: `(-sim).argsort()`
    for mAP, `argsort(sim)[:, ::-1]` for nDCG, so tied similarities land in an order that depends
    on numpy's sort implementation. mmvssl breaks ties deterministically against the model: among
    equal scores the less relevant items come first (metrics.query_ranks does the same for R@K), so
    a collapsed model cannot score by luck of the sort order (for nDCG this is the worst order of a
    tie; for graded mAP it puts every exact match after its tied partial matches, which is not
    always the very lowest AP). Without ties the two agree exactly, and with ties mmvssl equals
    the reference fed the same tie order (tests/test_mir_reference.py).
  - Queries without an item of relevancy 1 (mAP) or above 0 (nDCG). The reference divides by
    zero and its mean becomes NaN; mmvssl leaves such queries out of the mean and reports how
    many it left out (`excluded_v2t`, `excluded_t2v`). With every query valid, the numbers are
    the reference's. (EK-100's test matrix has none: each clip's own narration is relevant.)

Written here rather than imported because the reference is a script, not a package.
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
    """Per-query AP (Q,) as the EK-100 reference computes it: at the ranks k where relevancy == 1,
    the cumulative graded relevancy of the first k items over k; summed, divided by the number of
    items with relevancy == 1. NaN for a query without such an item."""
    ranked = _ranked_relevancy(similarity.double(), relevancy.double())  # (Q, N)
    exact = (ranked == 1).double()
    precision = ranked.cumsum(dim=1) / torch.arange(1, ranked.shape[1] + 1, dtype=torch.double)
    return (precision * exact).sum(dim=1) / exact.sum(dim=1)


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

    With R items of relevancy 1 among N and graded total T, the item at rank k is an exact match
    with probability R/N, and then the other k - 1 items above it carry on average
    (k - 1)(T - 1)/(N - 1) relevancy, so E[AP] = 1/N sum_k (1 + (k - 1)(T - 1)/(N - 1)) / k.
    """
    rel = relevancy.double()
    n = rel.shape[1]
    r = (rel == 1).sum(dim=1, keepdim=True)  # (Q, 1)
    total = rel.sum(dim=1, keepdim=True)
    k = torch.arange(1, n + 1, dtype=torch.double)
    frac = (total - 1) / max(n - 1, 1)
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
    each with its chance level and the number of queries left out for lack of a relevant item.
    similarity, relevancy: (num_videos, num_texts)."""
    out = {}
    for name, fn, chance in (("mAP", average_precision, expected_ap_random),
                             ("nDCG", ndcg, expected_ndcg_random)):
        per_v2t, per_t2v = fn(similarity, relevancy), fn(similarity.T, relevancy.T)
        v2t, t2v = _mean_over_valid(per_v2t), _mean_over_valid(per_t2v)
        c_v2t = _mean_over_valid(chance(relevancy))
        c_t2v = _mean_over_valid(chance(relevancy.T))
        out[name] = {"v2t": 100 * v2t, "t2v": 100 * t2v, "avg": 100 * (v2t + t2v) / 2,
                     "chance_avg": 100 * (c_v2t + c_t2v) / 2,
                     "excluded_v2t": int(torch.isnan(per_v2t).sum()),
                     "excluded_t2v": int(torch.isnan(per_t2v).sum())}
    return out
