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


def test_from_the_official_split_lists_to_the_mean_over_three_splits(trained_run, demo_data, tmp_path):
    """UCF101's release format end to end: ucfTrainTestlist/ -> datasets convert -> shards build ->
    eval suite with the three splits; the split roles travel through the shards' metadata."""
    import json
    import shutil

    from mmvssl.data.recipes import convert_dataset
    from mmvssl.data.shards import build_shards
    entries = [json.loads(line) for line in (demo_data / "val" / "captions.jsonl").read_text().splitlines()]
    videos, lists = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    classes = sorted({e["label"] for e in entries})
    (lists / "classInd.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, start=1)))
    names = []
    for g, e in enumerate(entries, start=1):
        rel = f"{e['label']}/v_{e['label']}_g{g:02d}_c01.avi"  # UCF101's layout (the bytes stay MP4)
        (videos / e["label"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_data / "val" / e["video"], videos / rel)
        names.append((rel, classes.index(e["label"]) + 1))
    for k in (1, 2, 3):
        test = {i for i in range(len(names)) if i % 3 == k - 1}
        (lists / f"trainlist0{k}.txt").write_text("".join(f"{r} {c}\n" for i, (r, c) in enumerate(names) if i not in test))
        (lists / f"testlist0{k}.txt").write_text("".join(f"{r}\n" for i, (r, _) in enumerate(names) if i in test))
    report = convert_dataset("ucf101", [lists], tmp_path / "conv", videos=videos)
    assert report["entries"] == len(names) and report["num_problems"] == 0
    build_shards(videos, tmp_path / "shards", captions=tmp_path / "conv" / "captions.jsonl", samples_per_shard=8)
    task_file = tmp_path / "ucf.yaml"
    task_file.write_text("name: ucf_like\nclasses: [" + ", ".join(classes) + "]\nprotocols: [knn]\nsplits:\n"
                         + "".join(f"- {{name: split{k}, key: split{k}, train: train, test: test}}\n" for k in (1, 2, 3)))
    summary = evaluate_suite(load_model(trained_run / "model"), load_task(task_file), str(tmp_path / "out"),
                             test=str(tmp_path / "shards"))
    knn = summary["results"]["knn"]
    assert [knn["splits"][f"split{k}"]["num_samples"] for k in (1, 2, 3)] == [4, 4, 4]
    assert knn["top1"] == pytest.approx(sum(knn["splits"][f"split{k}"]["top1"] for k in (1, 2, 3)) / 3)
    assert knn["aggregate"] == "mean over 3 splits"
