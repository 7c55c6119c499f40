"""The evaluation commands end to end on the tiny demo run: extract once, then every protocol."""

import json

import pytest

from mmvssl.cli import main


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def feature_files(trained_run, demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    files = {}
    for split in ("train", "val"):
        files[split] = out / f"{split}.safetensors"
        assert main(["extract", str(trained_run / "model"), "--data", str(demo_shards[split]),
                     "--out", str(files[split])]) == 0
    return files


def test_extract_records_every_embedding_and_the_model(feature_files):
    side = json.loads(feature_files["val"].with_suffix(".json").read_text())
    assert len(side["keys"]) == 12 and side["info"]["model"]["fingerprint"]
    from safetensors import safe_open
    with safe_open(str(feature_files["val"]), "pt") as f:
        names = set(f.keys())
    assert {"video_va", "video_vat", "audio_va", "audio_vat", "text_vat", "video_pooled"} <= names


def test_multi_clip_multi_crop_extraction(trained_run, demo_shards, tmp_path, capsys):
    last_shard = sorted(demo_shards["val"].glob("*.tar"))[-1]  # 4 samples: keeps the test fast
    code, out, _ = run_cli(capsys, "extract", trained_run / "model", "--data", last_shard, "--out",
                           tmp_path / "f.safetensors", "--clips", "2", "--crops", "3")
    assert code == 0 and "4 samples" in out
    side = json.loads((tmp_path / "f.json").read_text())
    assert side["info"]["sampling"]["num_clips"] == 2 and side["info"]["sampling"]["num_crops"] == 3


def test_zeroshot_report_with_task(trained_run, feature_files, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "eval", "zeroshot", trained_run / "model", "--data", feature_files["val"],
                           "--task", "demo", "--out", tmp_path / "zs")
    assert code == 0 and "chance top1 20.0" in out
    report = json.loads((tmp_path / "zs" / "report.json").read_text())
    assert {"top1", "top5", "chance_top1", "mean_class_acc", "commit", "model", "config"} <= set(report)
    assert report["num_samples"] == 12 and report["chance_top1"] == pytest.approx(20.0)
    page = (tmp_path / "zs" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # confusion, projection, similarity
    assert "| zeroshot | top1 |" in (tmp_path / "zs" / "report.md").read_text()


def test_audio_zeroshot_uses_the_vat_space(trained_run, feature_files, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "eval", "zeroshot", trained_run / "model", "--data", feature_files["val"],
                           "--task", "demo", "--modality", "audio", "--out", tmp_path / "zs")
    assert code == 0
    assert json.loads((tmp_path / "zs" / "report.json").read_text())["config"]["modality"] == "audio"


def test_linear_and_knn_reports(trained_run, feature_files, tmp_path, capsys):
    for kind in ("linear", "knn"):
        code, out, _ = run_cli(capsys, "eval", kind, trained_run / "model", "--train", feature_files["train"],
                               "--test", feature_files["val"], "--out", tmp_path / kind)
        assert code == 0, out
        report = json.loads((tmp_path / kind / "report.json").read_text())
        assert report["num_samples"] == 12 and report["num_train"] == 24 and 0 <= report["top1"] <= 100
        assert report["chance_top1"] == pytest.approx(100 / len(report["classes"]))
    assert json.loads((tmp_path / "knn" / "report.json").read_text())["k"] == 20


def test_retrieval_covers_every_pair_and_shows_examples(trained_run, feature_files, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "eval", "retrieval", trained_run / "model", "--data", feature_files["val"],
                           "--out", tmp_path / "r")
    assert code == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["retrieval"]) == {"t2v", "v2t", "a2v", "v2a", "t2a", "a2t"}
    page = (tmp_path / "r" / "report.html").read_text()
    assert "top-5 clips" in page and page.count("data:image/png;base64,") >= 10  # figures + thumbnails


def test_suite_runs_what_the_task_defines(trained_run, feature_files, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "eval", "suite", trained_run / "model", "--task", "demo", "--train",
                           feature_files["train"], "--test", feature_files["val"], "--out", tmp_path / "s")
    assert code == 0
    summary = json.loads((tmp_path / "s" / "report.json").read_text())
    assert set(summary["results"]) == {"zeroshot", "linear", "knn", "retrieval"}
    for protocol in ("zeroshot", "linear", "knn", "retrieval"):
        assert (tmp_path / "s" / protocol / "report.html").is_file()


def test_feature_file_of_another_model_is_refused(trained_run, feature_files, tmp_path, capsys):
    from mmvssl.models.multimodal import MultimodalModel
    from mmvssl.models.presets import load_model
    other = MultimodalModel(load_model(trained_run / "model").config)  # same preset, fresh weights
    other.save_pretrained(tmp_path / "other")
    code, _, err = run_cli(capsys, "eval", "knn", tmp_path / "other", "--train", feature_files["train"],
                           "--test", feature_files["val"], "--out", tmp_path / "k")
    assert code == 2 and "extracted with another model" in err and "re-run `mmvssl extract`" in err


def test_class_list_that_does_not_match_the_data(trained_run, feature_files, tmp_path, capsys):
    (tmp_path / "classes.txt").write_text("circle\nsquare\n")
    code, _, err = run_cli(capsys, "eval", "zeroshot", trained_run / "model", "--data", feature_files["val"],
                           "--classes", tmp_path / "classes.txt", "--out", tmp_path / "zs")
    assert code == 2 and "does not match the labels" in err and "classes.txt" in err


def test_compare_with_random_init_reports_both(trained_run, demo_shards, tmp_path):
    import importlib.util
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "eval" / "compare_random_init.py"
    spec = importlib.util.spec_from_file_location("compare_random_init", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    last_shard = str(sorted(demo_shards["val"].glob("*.tar"))[-1])
    report = module.compare(str(trained_run / "model"), last_shard, last_shard, str(tmp_path), ["video_va"])
    assert set(report["results"]) == {"linear video_va (trained)", "knn video_va (trained)",
                                      "linear video_va (random init)", "knn video_va (random init)"}
    assert report["model"]["fingerprint"] != report["random_init_model"]["fingerprint"]
    assert "(random init) | top1" in (tmp_path / "report.md").read_text()
