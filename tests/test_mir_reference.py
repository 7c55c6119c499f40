"""EK-100 MIR mAP / nDCG against the challenge's reference definition.

`_ref_map` and `_ref_ndcg` transcribe, for this test only, the numpy definition of
`calculate_mAP` / `calculate_nDCG` in LaViLa's lavila/utils/evaluation_ek100mir.py (the EK-100 MIR
challenge code): mAP sums the cumulative *graded* relevancy into precision@k at the ranks whose
relevancy is exactly 1, over the number of such items; nDCG cuts each query at its number of
items with relevancy > 0. Both order items with numpy's default argsort, whose order among tied
similarities is unspecified; mmvssl puts less relevant items first among ties (mmvssl/evaluation/
mir.py). So: without ties the numbers must agree to 1e-12; with ties they must agree once the
reference is fed mmvssl's tie order as distinct scores, and the tests say so where they do it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mmvssl.evaluation.mir import average_precision, expected_ap_random, mir_metrics, ndcg

GRADES = [0.0, 0.0, 0.0, 0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1.0]


def _ref_map(sim: np.ndarray, rel: np.ndarray) -> float:
    order = (-sim).argsort()  # numpy's default sort, as the reference
    rows = np.arange(sim.shape[0])[:, None]
    ranked = rel[rows, order]
    cum = np.cumsum(ranked, axis=1)
    cum[ranked != 1] = 0
    per_query = np.sum(cum / (np.arange(ranked.shape[1]) + 1), axis=1) / np.sum(ranked == 1, axis=1)
    return float(np.mean(per_query))


def _ref_ndcg(sim: np.ndarray, rel: np.ndarray) -> float:
    def dcg(s, r, cut):
        ranks = np.argsort(s)[:, ::-1]
        rows = np.repeat(np.arange(s.shape[0])[:, None], s.shape[1], axis=1)
        return np.sum(r[rows, ranks] * cut / np.log2(np.arange(s.shape[1]) + 2), axis=1)

    cut = (np.sort(rel)[:, ::-1] > 0).astype(int)
    return float(np.mean(dcg(sim, rel, cut) / dcg(rel, rel, cut)))


def _mmvssl_tie_order_as_scores(sim: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """Distinct scores that rank like mmvssl: similarity descending, then relevancy ascending,
    then index ascending (computed independently of the library, with lexsort)."""
    out = np.empty_like(sim)
    n = sim.shape[1]
    for i in range(sim.shape[0]):
        order = np.lexsort((np.arange(n), rel[i], -sim[i]))  # last key is the primary one
        out[i, order] = -np.arange(n, dtype=np.float64)
    return out


def _graded(rng, shape=(50, 80)) -> np.ndarray:
    rel = rng.choice(GRADES, size=shape)
    rel[np.arange(min(shape)), np.arange(min(shape))] = 1.0  # each clip's own narration
    return rel


@pytest.mark.parametrize("seed", range(5))
def test_map_and_ndcg_equal_the_reference_without_ties(seed):
    rng = np.random.default_rng(seed)
    rel = _graded(rng)
    sim = rng.normal(size=rel.shape)
    assert len(np.unique(sim)) == sim.size  # no ties
    m = mir_metrics(torch.from_numpy(sim), torch.from_numpy(rel))
    vis, txt = _ref_map(sim, rel), _ref_map(sim.T, rel.T)
    assert m["mAP"]["v2t"] == pytest.approx(100 * vis, abs=1e-10)
    assert m["mAP"]["t2v"] == pytest.approx(100 * txt, abs=1e-10)
    assert m["mAP"]["avg"] == pytest.approx(50 * (vis + txt), abs=1e-10)
    assert m["nDCG"]["avg"] == pytest.approx(50 * (_ref_ndcg(sim, rel) + _ref_ndcg(sim.T, rel.T)), abs=1e-10)
    assert m["mAP"]["excluded_v2t"] == m["mAP"]["excluded_t2v"] == 0
    # the graded definition really differs from counting exact matches only
    strict = np.mean([_strict_ap(s, r) for s, r in zip(sim, rel)])
    assert abs(vis - strict) > 1e-3


def _strict_ap(s, r):
    hits = r[np.argsort(-s)] == 1
    return np.sum(np.cumsum(hits) / np.arange(1, len(s) + 1) * hits) / hits.sum()


@pytest.mark.parametrize("seed", range(3))
def test_tied_similarities_equal_the_reference_fed_mmvssls_tie_order(seed):
    rng = np.random.default_rng(10 + seed)
    rel = _graded(rng)
    sim = np.round(rng.normal(size=rel.shape), 1)  # about 40 distinct values per 80-item row: many ties
    assert len(np.unique(sim)) < sim.size // 10
    m = mir_metrics(torch.from_numpy(sim), torch.from_numpy(rel))
    # mmvssl's tie rule (less relevant first) given to the reference as distinct scores
    rows = _mmvssl_tie_order_as_scores(sim, rel)
    cols = _mmvssl_tie_order_as_scores(sim.T, rel.T)
    assert m["mAP"]["v2t"] == pytest.approx(100 * _ref_map(rows, rel), abs=1e-10)
    assert m["mAP"]["t2v"] == pytest.approx(100 * _ref_map(cols, rel.T), abs=1e-10)
    assert m["nDCG"]["v2t"] == pytest.approx(100 * _ref_ndcg(rows, rel), abs=1e-10)
    assert m["nDCG"]["t2v"] == pytest.approx(100 * _ref_ndcg(cols, rel.T), abs=1e-10)
    # nDCG: less relevant first is the worst order of every tie, so never above the reference's own
    assert m["nDCG"]["v2t"] <= 100 * _ref_ndcg(sim, rel) + 1e-9


def test_collapsed_model_gets_the_pessimistic_number_the_reference_may_not():
    rel = np.eye(50, 80)
    sim = np.zeros((50, 80))
    m = mir_metrics(torch.from_numpy(sim), torch.from_numpy(rel))
    assert m["mAP"]["v2t"] == pytest.approx(100 / 80)  # the one match ranked last in every row
    assert m["mAP"]["v2t"] <= 100 * _ref_map(sim, rel) + 1e-9  # the reference's order is numpy's choice


def test_queries_without_a_relevant_item_are_left_out_where_the_reference_gives_nan():
    rng = np.random.default_rng(3)
    rel = _graded(rng)
    rel[5] = 0.0                                     # no relevant text at all
    rel[7] = np.where(rel[7] == 1, 0.5, rel[7])      # partial matches only: no mAP, but an nDCG
    rel[:, 60] = 0.0                                 # a text nothing matches
    sim = rng.normal(size=rel.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.isnan(_ref_map(sim, rel)) and np.isnan(_ref_ndcg(sim, rel))
    m = mir_metrics(torch.from_numpy(sim), torch.from_numpy(rel))
    ap_rows = (rel == 1).any(axis=1)
    ap_cols = (rel == 1).any(axis=0)
    dcg_rows = (rel > 0).any(axis=1)
    dcg_cols = (rel > 0).any(axis=0)
    assert m["mAP"]["v2t"] == pytest.approx(100 * _ref_map(sim[ap_rows], rel[ap_rows]), abs=1e-10)
    assert m["mAP"]["t2v"] == pytest.approx(100 * _ref_map(sim.T[ap_cols], rel.T[ap_cols]), abs=1e-10)
    assert m["nDCG"]["v2t"] == pytest.approx(100 * _ref_ndcg(sim[dcg_rows], rel[dcg_rows]), abs=1e-10)
    assert m["nDCG"]["t2v"] == pytest.approx(100 * _ref_ndcg(sim.T[dcg_cols], rel.T[dcg_cols]), abs=1e-10)
    assert (m["mAP"]["excluded_v2t"], m["mAP"]["excluded_t2v"]) == (int((~ap_rows).sum()), int((~ap_cols).sum()))
    assert (m["nDCG"]["excluded_v2t"], m["nDCG"]["excluded_t2v"]) == (1, int((~dcg_cols).sum()))
    assert m["mAP"]["excluded_v2t"] >= 2


def test_graded_map_by_hand_and_its_chance_level():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    rel = torch.tensor([[1.0, 0.0, 1.0, 0.5]])  # exact at ranks 1 and 3; a partial after them
    assert average_precision(sim, rel).item() == pytest.approx((1 / 1 + 2 / 3) / 2)
    rel = torch.tensor([[0.5, 1.0, 0.0, 1.0]])  # the partial at rank 1 lifts both exact matches
    assert average_precision(sim, rel).item() == pytest.approx(((0.5 + 1) / 2 + (0.5 + 1 + 0 + 1) / 4) / 2)
    rel = torch.tensor([[1.0, 0.5, 0.25, 0.0, 1.0, 0.0, 0.75, 0.0, 0.0, 1.0, 0.0, 0.0]])
    torch.manual_seed(0)
    draws = torch.stack([average_precision(torch.rand(1, 12), rel) for _ in range(4000)]).mean()
    assert expected_ap_random(rel).item() == pytest.approx(draws.item(), abs=0.01)


def test_ndcg_per_query_matches_the_reference_per_query():
    rng = np.random.default_rng(4)
    rel = _graded(rng, (20, 30))
    sim = rng.normal(size=rel.shape)
    ours = ndcg(torch.from_numpy(sim), torch.from_numpy(rel)).numpy()
    assert np.allclose(ours, [_ref_ndcg(sim[i:i + 1], rel[i:i + 1]) for i in range(20)], atol=1e-12)
