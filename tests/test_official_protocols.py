"""Official protocols: splits and folds run inside one feature set with the mean over them
reported (UCF101, HMDB51, ESC-50), retrieval-only tasks (MSR-VTT 1k-A, YouCook2), EK-100 MIR
from the task's relevancy file, and R@K / MedR against the `compute_metrics` of the MSR-VTT
literature (CLIP4Clip, Frozen-in-Time), transcribed here for the test only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmvssl.errors import MmvsslError
from mmvssl.evaluation.features import extract_features, save_features
from mmvssl.evaluation.metrics import query_ranks, retrieval_metrics
from mmvssl.evaluation.protocols import evaluate_suite
from mmvssl.evaluation.splits import parse_splits, split_indices, subset_features
from mmvssl.evaluation.tasks import load_task
from mmvssl.models.presets import load_model


def _ref_compute_metrics(x: np.ndarray) -> dict:
    """The R@K / MedR of CLIP4Clip's and Frozen-in-Time's metrics.py: queries are rows, the
    relevant item of row i is column i; a rank is where the diagonal's value first and every later
    equal value sits in the row sorted descending (so a tied row is counted once per tie)."""
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, None]
    ind = np.where(sx - d == 0)[1]
    return {"R1": 100 * np.sum(ind == 0) / len(ind), "R5": 100 * np.sum(ind < 5) / len(ind),
            "R10": 100 * np.sum(ind < 10) / len(ind), "MR": np.median(ind) + 1, "counted": len(ind)}


@pytest.mark.parametrize("seed", range(3))
def test_recall_and_median_rank_equal_compute_metrics_without_ties(seed):
    rng = np.random.default_rng(seed)
    sim = rng.normal(size=(60, 60)) + 1.5 * np.eye(60)  # text x video, the diagonal is the pair
    ref = _ref_compute_metrics(sim)
    ours = retrieval_metrics(torch.from_numpy(sim), torch.eye(60, dtype=torch.bool))
    assert ref["counted"] == 60
    assert (ours["R@1"], ours["R@5"], ours["R@10"]) == pytest.approx((ref["R1"], ref["R5"], ref["R10"]))
    assert ours["MedR"] == pytest.approx(ref["MR"])


def test_ties_the_reference_counts_a_query_once_per_tie_mmvssl_once_at_its_worst():
    sim = np.array([[0.5, 0.5, 0.5, 0.1],    # the pair tied with two others: ranks 1..3
                    [0.2, 0.9, 0.1, 0.0],    # rank 1
                    [0.3, 0.3, 0.3, 0.3],    # collapsed: ranks 1..4
                    [0.8, 0.1, 0.2, 0.5]])   # rank 2
    ref = _ref_compute_metrics(sim)
    assert ref["counted"] == 3 + 1 + 4 + 1  # 9 "queries" from 4 rows: the reference's treatment of ties
    ranks = query_ranks(torch.from_numpy(sim), torch.eye(4, dtype=torch.bool)).tolist()
    assert ranks == [3, 1, 4, 2]  # mmvssl: one rank per query, every tied item counted ahead of it
    sx = np.sort(-sim, axis=1)
    worst = [int(np.nonzero(sx[i] == -sim[i, i])[0].max()) + 1 for i in range(4)]
    assert ranks == worst  # the last of the reference's positions for that query
    ours = retrieval_metrics(torch.from_numpy(sim), torch.eye(4, dtype=torch.bool))
    assert ours["R@1"] == 25.0 and ref["R1"] == pytest.approx(100 * 3 / 9)  # they differ only through ties


def test_split_definitions_and_subsets():
    splits = parse_splits([{"name": "fold1", "key": "fold", "train": [2, 3, 4, 5], "test": [1]}], "t")
    metas = [{"fold": f} for f in (1, 2, 3, 1, 5)] + [{}]
    fs = {"keys": list("abcdef"), "captions": [""] * 6, "labels": list("xyxyxy"), "sources": [""] * 6, "metas": metas,
          "video_pooled": torch.arange(6.0)[:, None], "has_audio": torch.ones(6, dtype=torch.bool),
          "text_owner": torch.tensor([0, 0, 3, 5]), "text_captions": ["p", "q", "r", "s"],
          "text_vat": torch.arange(4.0)[:, None], "info": {"data": "d"}}
    train, test = split_indices(fs, splits[0], "t")
    assert (train, test) == ([1, 2, 4], [0, 3])
    sub = subset_features(fs, test, "fold1 test")
    assert sub["keys"] == ["a", "d"] and sub["video_pooled"].flatten().tolist() == [0.0, 3.0]
    assert sub["text_owner"].tolist() == [0, 0, 1] and sub["text_captions"] == ["p", "q", "r"]
    assert sub["text_vat"].flatten().tolist() == [0.0, 1.0, 2.0] and sub["info"]["data"] == "d [fold1 test]"
    with pytest.raises(MmvsslError, match="both train and test"):
        parse_splits([{"name": "s", "key": "k", "train": ["a"], "test": ["a"]}], "t")
    with pytest.raises(MmvsslError, match="no sample has 'split9'"):
        split_indices(fs, parse_splits([{"name": "s", "key": "split9", "train": "train", "test": "test"}], "t")[0], "t")


def test_shipped_tasks_define_the_official_protocols():
    assert [s.name for s in load_task("ucf101").splits] == ["split1", "split2", "split3"]
    assert [s.name for s in load_task("hmdb51").splits] == ["split1", "split2", "split3"]
    folds = load_task("esc50").splits
    assert [(s.train, s.test) for s in folds][0] == (["2", "3", "4", "5"], ["1"]) and len(folds) == 5
    for name in ("msrvtt", "youcook2", "ek100_mir"):
        task = load_task(name)
        assert task.protocols == ["retrieval"] and task.classes == []
    assert load_task("ek100_mir").relevancy.endswith("relevancy.npz")


@pytest.fixture(scope="module")
def val_features(trained_run, demo_shards):
    model = load_model(trained_run / "model")
    return model, extract_features(model, str(demo_shards["val"]))


def test_suite_runs_every_split_and_reports_the_mean(val_features, tmp_path):
    model, fs = val_features
    fs = dict(fs)
    n = len(fs["keys"])
    fs["metas"] = [{**m, "split1": "train" if i % 2 else "test", "split2": "test" if i % 3 == 0 else "train"}
                   for i, m in enumerate(fs["metas"])]
    path = save_features(fs, tmp_path / "pool.safetensors")
    task_file = tmp_path / "task.yaml"
    task_file.write_text("name: demo_splits\nclasses: [circle, square, triangle, cross, ring]\n"
                         "templates: ['a {} moves.']\nprotocols: [zeroshot, knn]\n"
                         "splits:\n- {name: s1, key: split1, train: train, test: test}\n"
                         "- {name: s2, key: split2, train: train, test: test}\n")
    summary = evaluate_suite(model, load_task(task_file), str(tmp_path / "out"), test=str(path))
    for protocol in ("zeroshot", "knn"):
        r = summary["results"][protocol]
        assert set(r["splits"]) == {"s1", "s2"}
        assert r["top1"] == pytest.approx((r["splits"]["s1"]["top1"] + r["splits"]["s2"]["top1"]) / 2)
        assert r["splits"]["s1"]["num_samples"] == sum(1 for i in range(n) if i % 2 == 0)
        assert r["splits"]["s2"]["num_samples"] == sum(1 for i in range(n) if i % 3 == 0)
    assert (tmp_path / "out" / "knn" / "s2" / "report.html").is_file()


def test_ek100_task_reads_its_relevancy_and_reports_map(val_features, tmp_path):
    model, fs = val_features
    path = save_features(fs, tmp_path / "ek.safetensors")
    texts = sorted(set(fs["captions"]))
    rel = np.array([[1.0 if c == t else 0.0 for t in texts] for c in fs["captions"]], dtype=np.float32)
    np.savez(tmp_path / "relevancy.npz", keys=np.array(fs["keys"]), texts=np.array(texts), relevancy=rel)
    task_file = tmp_path / "ek.yaml"
    task_file.write_text(f"name: ek\nprotocols: [retrieval]\nrelevancy: {tmp_path / 'relevancy.npz'}\n")
    summary = evaluate_suite(model, load_task(task_file), str(tmp_path / "out"), test=str(path))
    mir = summary["results"]["retrieval"]["mir"]
    assert 0 <= mir["mAP"]["avg"] <= 100 and mir["mAP"]["excluded_v2t"] == 0 and "nDCG" in mir
