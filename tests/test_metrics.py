import pytest
import torch

from mmvssl.evaluation.metrics import query_ranks, retrieval_metrics
from mmvssl.evaluation.retrieval import retrieval_report


def test_ranks_on_a_hand_built_matrix():
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.0],   # relevant item 0 ranked 1st
                        [0.5, 0.4, 0.6, 0.1],   # relevant item 1 behind 0 and 2: rank 3
                        [0.1, 0.2, 0.3, 0.4],   # relevant item 2 behind 3: rank 2
                        [0.4, 0.3, 0.2, 0.1]])  # relevant item 3 last: rank 4
    ranks = query_ranks(sim, torch.eye(4, dtype=torch.bool))
    assert ranks.tolist() == [1, 3, 2, 4]
    m = retrieval_metrics(sim, torch.eye(4, dtype=torch.bool), ks=(1, 2, 3))
    assert m["R@1"] == pytest.approx(25.0)
    assert m["R@2"] == pytest.approx(50.0)
    assert m["R@3"] == pytest.approx(75.0)
    assert m["MedR"] == pytest.approx(2.5)
    assert m["MeanR"] == pytest.approx(2.5)
    assert m["chance_R@1"] == pytest.approx(25.0)


def test_several_relevant_items_use_the_best_one():
    sim = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    rel = torch.tensor([[True, False, True], [False, True, True]])
    assert query_ranks(sim, rel).tolist() == [2, 2]
    assert retrieval_metrics(sim, rel)["chance_R@1"] == pytest.approx(100 * 2 / 3)


def test_ties_are_counted_against_the_model():
    sim = torch.zeros(5, 5)  # a collapsed model: every score equal
    m = retrieval_metrics(sim, torch.eye(5, dtype=torch.bool))
    assert m["R@1"] == 0.0 and m["MedR"] == 5.0


def test_random_scores_sit_near_chance():
    torch.manual_seed(0)
    n = 400
    m = retrieval_metrics(torch.randn(n, n), torch.eye(n, dtype=torch.bool))
    assert m["MedR"] == pytest.approx(n / 2, rel=0.2)


def test_report_relevance_by_identical_caption():
    v = torch.eye(4)
    emb = {"keys": list("abcd"), "captions": ["x", "y", "x", "z"], "video_vat": v, "text_vat": v.clone(),
           "video_va": v, "audio_va": v.clone(), "has_audio": torch.tensor([True, True, True, False]),
           "has_text": torch.ones(4, dtype=torch.bool), "failed": 0}
    emb["text_vat"][2] = v[0]  # clip c's caption equals clip a's: same content, text lands on video a
    report = retrieval_report(emb)["retrieval"]
    assert report["t2v"]["R@1"] == 100.0  # video a is relevant to caption 'x' of clip c
    assert report["t2v"]["chance_R@1"] == pytest.approx(100 * (2 + 1 + 2 + 1) / 16)
    assert report["a2v"]["num_queries"] == 3  # clip d has no audio
    assert report["a2v"]["R@1"] == 100.0


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        query_ranks(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.bool))


# ---- chance levels, EK-100 MIR, classification: hand-built answers and independent numpy loops

import numpy as np  # noqa: E402

from mmvssl.evaluation.accuracy import classification_metrics, topk_correct  # noqa: E402
from mmvssl.evaluation.metrics import chance_recall_at  # noqa: E402
from mmvssl.evaluation.mir import average_precision, expected_ap_random, mir_metrics, ndcg  # noqa: E402
from mmvssl.evaluation.retrieval import caption_relevance, retrieval_directions  # noqa: E402


def test_chance_recall_matches_the_counting_argument():
    assert chance_recall_at(torch.eye(10, dtype=torch.bool), 5) == pytest.approx(50.0)
    rel = torch.zeros(1, 4, dtype=torch.bool)
    rel[0, :2] = True  # 2 relevant of 4: P(none in top 1) = 2/4, top 2 = (2/4)(1/3)
    assert chance_recall_at(rel, 1) == pytest.approx(50.0)
    assert chance_recall_at(rel, 2) == pytest.approx(100 * (1 - 1 / 6))


def test_average_precision_by_hand():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    rel = torch.tensor([[1.0, 0.0, 1.0, 0.5]])  # exact (==1) at ranks 1 and 3; the 0.5 after them adds nothing
    assert average_precision(sim, rel).item() == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_ndcg_by_hand():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    rel = torch.tensor([[0.5, 1.0, 0.0, 0.0]])  # two relevant: cut at 2
    dcg = 0.5 / np.log2(2) + 1.0 / np.log2(3)
    idcg = 1.0 / np.log2(2) + 0.5 / np.log2(3)
    assert ndcg(sim, rel).item() == pytest.approx(dcg / idcg)
    assert ndcg(torch.tensor([[0.1, 0.9, 0.0, 0.0]]), rel).item() == pytest.approx(1.0)


def _ap_loop(sim, rel):
    out = []
    for s, r in zip(sim, rel):
        order = np.argsort(-s, kind="stable")
        graded, total = 0.0, 0.0  # EK-100's AP: graded relevancy so far, at the exact matches
        for k, j in enumerate(order, start=1):
            graded += r[j]
            if r[j] == 1:
                total += graded / k
        out.append(total / (r == 1).sum())
    return np.mean(out)


def _ndcg_loop(sim, rel):
    out = []
    for s, r in zip(sim, rel):
        n = int((r > 0).sum())
        ranked = r[np.argsort(-s, kind="stable")][:n]
        ideal = np.sort(r)[::-1][:n]
        disc = 1 / np.log2(np.arange(2, n + 2))
        out.append((ranked * disc).sum() / (ideal * disc).sum())
    return np.mean(out)


def test_mir_against_an_independent_loop():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(30, 20))
    rel = rng.choice([0.0, 0.25, 0.5, 1.0], size=(30, 20), p=[0.6, 0.15, 0.1, 0.15])
    rel[np.arange(20), np.arange(20)] = 1.0  # every row and column has a relevant item
    rel[20:, :] = np.where(rel[20:, :] == 1, 0.5, rel[20:, :])
    rel[20:, 0] = 1.0
    m = mir_metrics(torch.from_numpy(sim), torch.from_numpy(rel))
    assert m["mAP"]["v2t"] == pytest.approx(100 * _ap_loop(sim, rel))
    assert m["mAP"]["t2v"] == pytest.approx(100 * _ap_loop(sim.T, rel.T))
    assert m["nDCG"]["v2t"] == pytest.approx(100 * _ndcg_loop(sim, rel))
    assert m["nDCG"]["avg"] == pytest.approx(50 * (_ndcg_loop(sim, rel) + _ndcg_loop(sim.T, rel.T)))


def test_map_chance_formula_matches_random_rankings():
    rel = torch.zeros(1, 12)
    rel[0, :3] = 1.0
    torch.manual_seed(0)
    draws = torch.stack([average_precision(torch.rand(1, 12), rel) for _ in range(4000)]).mean()
    assert expected_ap_random(rel).item() == pytest.approx(draws.item(), abs=0.01)


def test_mir_ties_count_against_the_model():
    m = mir_metrics(torch.zeros(4, 4), torch.eye(4))
    assert m["mAP"]["avg"] == pytest.approx(100 * np.mean([1 / 4]))  # the relevant item last every time


def test_classification_metrics_by_hand():
    scores = torch.tensor([[0.9, 0.05, 0.05],   # true 0, right
                           [0.1, 0.2, 0.7],     # true 1, wrong (2), 1 is second
                           [0.2, 0.3, 0.5],     # true 2, right
                           [0.6, 0.3, 0.1]])    # true 2, wrong, 2 is last
    m = classification_metrics(scores, torch.tensor([0, 1, 2, 2]))
    assert m["top1"] == pytest.approx(50.0)
    assert m["mean_class_acc"] == pytest.approx(100 * (1 + 0 + 0.5) / 3)
    assert m["confusion"] == [[1, 0, 0], [0, 0, 1], [1, 0, 1]]
    assert m["chance_top1"] == pytest.approx(100 / 3) and m["top5"] == 100.0 and m["chance_top5"] == 100.0
    assert topk_correct(scores, torch.tensor([0, 1, 2, 2]), 2).tolist() == [True, True, True, False]


def test_topk_against_numpy_and_ties_are_pessimistic():
    rng = np.random.default_rng(1)
    scores, targets = rng.normal(size=(200, 12)), rng.integers(12, size=200)
    top5 = np.argsort(-scores, axis=1)[:, :5]
    expected = 100 * np.mean([t in row for t, row in zip(targets, top5)])
    assert classification_metrics(torch.from_numpy(scores), torch.from_numpy(targets))["top5"] == pytest.approx(expected)
    m = classification_metrics(torch.zeros(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]))  # collapsed model
    assert m["top1"] == 0.0 and m["mean_class_acc"] == 0.0


def test_several_captions_per_video_are_all_relevant():
    # MSR-VTT style: video 0 has captions a, b; video 1 has b (shared with 0), video 2 has c
    owner = torch.tensor([0, 0, 1, 2])
    rel = caption_relevance(owner, ["a", "b", "b", "c"], 3)
    assert rel.tolist() == [[True, False, False], [True, True, False], [True, True, False], [False, False, True]]
    v = torch.eye(3)
    emb = {"keys": ["x", "y", "z"], "text_owner": owner, "text_captions": ["a", "b", "b", "c"],
           "text_vat": torch.stack([v[0], v[1], v[1], v[2]]) , "video_vat": v, "has_text": torch.ones(3, dtype=torch.bool),
           "has_audio": torch.zeros(3, dtype=torch.bool), "failed": 0}
    d = retrieval_directions(emb)
    assert d["t2v"][0]["num_queries"] == 4 and d["t2v"][0]["R@1"] == 100.0
    assert d["v2t"][0]["num_queries"] == 3 and d["v2t"][0]["R@1"] == 100.0  # best of a video's captions
    assert "a2v" not in d  # no audio: no audio directions


def test_scores_within_the_tie_tolerance_are_ties_whatever_their_last_bits():
    # another CPU computes the same cosines with other last bits: a relevant item and a non-relevant
    # one 1e-7 apart, in either order, are the same tie, counted against the model both ways
    from mmvssl.evaluation.metrics import TIE_TOLERANCE
    relevant = torch.tensor([[True, False, False]])
    for eps in (1e-7, -1e-7, 0.4 * TIE_TOLERANCE, -0.4 * TIE_TOLERANCE):
        assert query_ranks(torch.tensor([[0.5, 0.5 + eps, 0.1]], dtype=torch.float64), relevant).tolist() == [2]
        scores = torch.tensor([[0.5, 0.5 + eps, 0.1]], dtype=torch.float64)
        assert not topk_correct(scores, torch.tensor([0]), 1).item()
    # a real difference is not a tie
    assert query_ranks(torch.tensor([[0.5, 0.5 - 1e-3, 0.1]]), relevant).tolist() == [1]
    assert topk_correct(torch.tensor([[0.5, 0.5 - 1e-3, 0.1]]), torch.tensor([0]), 1).item()
