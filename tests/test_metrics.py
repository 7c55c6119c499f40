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
