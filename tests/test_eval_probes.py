import numpy as np
import pytest
import torch

from mmvssl.errors import MmvsslError
from mmvssl.evaluation.features import require
from mmvssl.evaluation.knn import knn_scores
from mmvssl.evaluation.linear_probe import fit_logistic, holdout_split, linear_probe
from mmvssl.evaluation.tasks import load_task, match_labels, prompt_name, read_class_file
from mmvssl.resources import data_path


def _knn_loop(train, labels, test, c, k, t):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = np.zeros((len(test), c))
    for i, q in enumerate(test / np.linalg.norm(test, axis=1, keepdims=True)):
        sims = train @ q
        for j in np.argsort(-sims)[:k]:
            out[i, labels[j]] += np.exp(sims[j] / t)
    return out


def test_knn_against_an_independent_loop():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(60, 8)), rng.normal(size=(15, 8))
    labels = rng.integers(4, size=60)
    got = knn_scores(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(test), 4, k=20)
    # the library works in float32, the loop in float64: similarities differ by ~1e-7, each vote
    # exp(s / 0.07) by ~1e-6 relative, hence rtol 1e-4. The 20 neighbours are the same in both only
    # if the 20th and 21st are further apart than that: they are, for every query of this seed
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = -np.sort(-(unit(test) @ unit(train).T), axis=1)
    assert (sims[:, 19] - sims[:, 20]).min() > 1e-4
    np.testing.assert_allclose(got.numpy(), _knn_loop(train, labels, test, 4, 20, 0.07), rtol=1e-4)


def test_logistic_regression_reaches_the_optimum():
    rng = np.random.default_rng(0)
    x, y, wd = rng.normal(size=(80, 5)), rng.integers(3, size=80), 0.1
    w, b = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), 3, wd)
    w, b = w.numpy(), b.numpy()
    # gradient of mean cross-entropy + wd/2 |W|^2, by hand in numpy: zero at the optimum
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(80), y] -= 1
    assert np.abs(p.T @ x / 80 + wd * w).max() < 1e-5
    assert np.abs(p.mean(0)).max() < 1e-5


def test_linear_probe_separates_separable_classes_and_sweeps_decay():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 4
    y_train, y_test = torch.arange(80) % 4, torch.arange(40) % 4
    x_train = centres[y_train] + torch.randn(80, 16, generator=g)
    x_test = centres[y_test] + torch.randn(40, 16, generator=g)
    m, _ = linear_probe(x_train, y_train, x_test, y_test, 4)
    assert m["top1"] == 100.0 and m["chance_top1"] == 25.0
    assert set(m["sweep_heldout_top1"]) == {"0.0", "0.0001", "0.001", "0.01", "0.1"}
    fit, held = holdout_split(y_train, 0.2)
    assert len(held) == 16 and not set(fit.tolist()) & set(held.tolist())


def test_every_shipped_task_loads_with_its_class_count():
    counts = {"ucf101": 101, "hmdb51": 51, "kinetics400": 400, "kinetics600": 600, "kinetics700": 700,
              "esc50": 50, "demo": 5, "msrvtt": 0, "youcook2": 0, "ek100_mir": 0}  # retrieval tasks: no classes
    for name, n in counts.items():
        task = load_task(name)
        assert len(task.classes) == n, name
        assert all("{}" in t for t in task.templates)
    assert load_task("esc50").modality == "audio"
    assert {p.stem for p in data_path("eval", "tasks").glob("*.yaml")} == set(counts)


def test_prompt_names_and_class_files(tmp_path):
    assert prompt_name("ApplyEyeMakeup") == "apply eye makeup"
    assert prompt_name("crackling_fire") == "crackling fire"
    assert prompt_name("passing American football (in game)") == "passing american football (in game)"
    (tmp_path / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 ApplyLipstick\n")
    assert read_class_file(tmp_path / "classInd.txt") == ["ApplyEyeMakeup", "ApplyLipstick"]


def test_labels_outside_the_class_list_are_named():
    with pytest.raises(MmvsslError, match=r"does not match the labels of val.*'hexagon'"):
        match_labels(["circle", "hexagon"], ["circle", "square"], "val", "demo.yaml")
    with pytest.raises(MmvsslError, match="differs only in case"):
        match_labels(["Circle"], ["circle"], "val", "demo.yaml")
    with pytest.raises(MmvsslError, match="have no label"):
        match_labels(["circle", None], ["circle"], "val", "demo.yaml")


def test_missing_modality_is_named():
    features = {"video_vat": torch.zeros(2, 4), "has_audio": torch.zeros(2, dtype=torch.bool),
                "has_text": torch.zeros(2, dtype=torch.bool), "audio_vat": torch.zeros(2, 4)}
    with pytest.raises(MmvsslError, match="no sample in shards/x has an audio track"):
        require(features, "audio_vat", "shards/x", "zero-shot audio classification")
    with pytest.raises(MmvsslError, match="needs 'text_vat' embeddings"):
        require(features, "text_vat", "shards/x", "retrieval")
