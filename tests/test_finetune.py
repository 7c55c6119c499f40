"""Fine-tuning (`mmvssl finetune`, method `supervised`): the recipe's parts by hand (label smoothing,
mixup / cutmix, layer-wise lr decay), labels mapped as the evaluation maps them, the labelled
fraction chosen by key, and a fine-tuned classifier that reloads and scores the same."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmvssl.errors import MmvsslError

TINY = ["data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=8", "train.warmup_steps=1",
        "train.log_every=1", "train.save_every=0", "train.log_with=none", "method.options.eval_every=0"]


def test_smoothed_cross_entropy_by_hand():
    from mmvssl.methods.supervised import smooth_one_hot, soft_cross_entropy
    y = smooth_one_hot(torch.tensor([2, 0]), 4, 0.2)
    torch.testing.assert_close(y, torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]]))
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    log_p1 = torch.tensor([1.0, 0.0, 0.0, 0.0]) - torch.logsumexp(torch.tensor([1.0, 0.0, 0.0, 0.0]), 0)
    expected = (-torch.log(torch.tensor(0.25)) - (y[1] * log_p1).sum()) / 2
    torch.testing.assert_close(soft_cross_entropy(logits, y), expected)


def test_mixup_mixes_the_batch_with_its_reverse_and_the_targets_alike():
    from mmvssl.methods.supervised import mix_batch
    torch.manual_seed(0)
    video, targets = torch.randn(3, 3, 2, 8, 8), torch.eye(3)
    mixed, soft, info = mix_batch(video, targets, mixup=0.8, cutmix=0.0)
    lam = info["lam"]
    assert info["kind"] == "mixup" and 0 < lam < 1
    torch.testing.assert_close(mixed, lam * video + (1 - lam) * video.flip(0))
    torch.testing.assert_close(soft[0], torch.tensor([lam, 0.0, 1 - lam]))


def test_cutmix_pastes_one_box_in_every_frame_and_weights_targets_by_area():
    from mmvssl.methods.supervised import mix_batch
    torch.manual_seed(3)
    video = torch.stack([torch.full((3, 4, 16, 16), float(i)) for i in range(2)])  # clip i is all i
    mixed, soft, info = mix_batch(video, torch.eye(2), mixup=0.0, cutmix=1.0)
    assert info["kind"] == "cutmix"
    pasted = (mixed[0] == 1.0).float().mean().item()  # share of clip 0 that comes from clip 1
    assert pasted > 0 and pasted == pytest.approx(1 - info["lam"])
    assert torch.equal(mixed[0, :, 0] == 1.0, mixed[0, :, 3] == 1.0)  # the same box in the first and last frame
    torch.testing.assert_close(soft[0], torch.tensor([info["lam"], 1 - info["lam"]]))


def test_layer_wise_lr_decay_by_hand_and_in_the_optimizer():
    from mmvssl.methods.supervised import layer_decay_scale
    from mmvssl.train.optim import build_optimizer
    names = ["backbone.encoders.video.pos_t", "backbone.encoders.video.stem.layers.0.weight",
             "backbone.encoders.video.transformer.blocks.0.attn.qkv.weight",
             "backbone.encoders.video.transformer.blocks.1.mlp.0.weight",
             "backbone.encoders.video.transformer.norm.weight", "head.weight"]
    scale = layer_decay_scale(names, 0.5)
    assert [scale[n] for n in names] == [0.125, 0.125, 0.25, 0.5, 1.0, 1.0]

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    opt = build_optimizer(net, 0.1, 0.05, lr_scale={"0.weight": 0.25, "0.bias": 0.25})
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(net[0].weight)] == pytest.approx(0.025) and lrs[id(net[0].bias)] == pytest.approx(0.025)
    assert lrs[id(net[1].weight)] == pytest.approx(0.1)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(net[0].weight)] == 0.05 and decay[id(net[0].bias)] == 0.0


def test_labelled_subset_is_per_class_by_key_hash_and_the_same_in_another_process():
    """ceil(fraction x n) of each class, the keys of lowest hash (by hand); identical in another
    interpreter (another hash seed: another process of the run, or a resumed one); nested."""
    from mmvssl.data.labels import key_hash, labelled_keys
    labels = {f"video{i:05d}": ["a", "b", "c"][i % 3] for i in range(300)}  # 100 per class
    labels["nolabel"] = None
    ten, one = labelled_keys(labels, 0.1), labelled_keys(labels, 0.01)
    for c in "abc":
        ranked = sorted((k for k, v in labels.items() if v == c), key=key_hash)
        assert {k for k in ten if labels[k] == c} == set(ranked[:10])
        assert {k for k in one if labels[k] == c} == set(ranked[:1])
    assert len(ten) == 30 and len(one) == 3 and one <= ten and "nolabel" not in ten
    assert labelled_keys(labels, 0.1, salt=1) != ten  # the salt draws another subset
    assert labelled_keys({"x": "a", "y": "b"}, 0.01) == {"x", "y"}  # every class keeps one label
    code = ("from mmvssl.data.labels import labelled_keys; "
            "print(','.join(sorted(labelled_keys({f'video{i:05d}': 'abc'[i % 3] for i in range(300)}, 0.1))))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip().split(",")
    assert other == sorted(ten)


def test_batch_targets_map_labels_and_mark_unlabelled():
    from mmvssl.data.labels import batch_targets
    batch = {"key": ["k0", "k1", "k2", "k3"], "meta": [{"label": "b"}, {"label": "a"}, {"label": "b"}, {"label": "c"}]}
    assert batch_targets(batch, ["a", "b"], labelled=frozenset({"k0", "k1"})).tolist() == [1, 0, -1, -1]
    with pytest.raises(MmvsslError, match=r"sample k3: label 'c' .* not one of the 2 classes"):
        batch_targets(batch, ["a", "b"])


def test_the_loader_draws_the_labelled_share_from_the_labelled_samples(demo_shards):
    """labelled_share 1: every sample of the stream is labelled; 0.5: about half; across resumes the
    stream is the loader's (same batches)."""
    from mmvssl.config import load_config
    from mmvssl.data.labels import labelled_keys, shard_labels
    from mmvssl.data.loader import build_loader
    from mmvssl.data.options import sample_spec
    keys = labelled_keys(shard_labels(str(demo_shards["train"])), 0.1)
    assert len(keys) == 5  # one of each of the 5 shapes among 24 samples

    def stream(share, start=0, n=6):
        cfg = load_config(None, [f"data.labelled_share={share}", "data.size=32", "data.num_frames=4"])
        spec = sample_spec(cfg.data, True, 0)
        spec.labelled_keys = keys
        it = iter(build_loader(str(demo_shards["train"]), spec, 4, shuffle_buffer=8, start_batch=start))
        return [next(it)["key"] for _ in range(n)]
    only = [k for batch in stream(1.0) for k in batch]
    assert set(only) <= keys
    half = [k for batch in stream(0.5) for k in batch]
    assert 4 <= sum(k in keys for k in half) <= 20 and not set(half) <= keys
    assert stream(0.5, start=2, n=4) == stream(0.5)[2:]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, demo_shards):
    """A tiny video-tiny model saved as a folder, sampling 4 frames of 32 px; its stem's BatchNorm
    statistics are those of the demo clips (as a pretrained model's are), not the initial 0 / 1."""
    from mmvssl.data.loader import SampleSpec, build_loader
    from mmvssl.models.presets import create_model
    torch.manual_seed(0)
    model = create_model("video-tiny", **{"video.num_frames": 4, "video.image_size": 32, "heads.hidden": 64})
    model.config["sampling"] = {"num_frames": 4, "fps": 2.0, "size": 32, "audio_rate": 16000}
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batches below
    with torch.no_grad():
        for batch in build_loader(str(demo_shards["train"]), SampleSpec(num_frames=4, fps=2.0, size=32, train=False), 8):
            model.encoders["video"](batch["video"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    folder = tmp_path_factory.mktemp("pretrained") / "model"
    model.save_pretrained(folder)
    return folder


def test_unknown_label_stops_before_training_with_the_labels_that_do_not_match(pretrained, demo_shards, tmp_path):
    from mmvssl.commands.finetune import finetune_config
    from mmvssl.train.engine import pretrain
    task = tmp_path / "task.yaml"
    task.write_text("name: partial\nclasses: [circle, square, triangle]\n")
    cfg = finetune_config(str(pretrained), str(demo_shards["train"]), str(task), str(tmp_path / "run"),
                          overrides=[*TINY, "train.max_steps=2"])
    with pytest.raises(MmvsslError, match=r"2 label\(s\) not in it, e\.g\. \['cross', 'ring'\]"):
        pretrain(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_finetune_keeps_the_best_by_val_and_the_classifier_reloads_and_scores_the_same(pretrained, demo_shards,
                                                                                       tmp_path, capsys):
    from mmvssl.cli import main
    from mmvssl.evaluation.classifier import classify_shards
    from mmvssl.evaluation.features import ExtractOptions
    from mmvssl.models.classifier import load_classifier
    out = tmp_path / "ft"
    # the demo has no third split: its train shards stand in for a validation set (the mechanism is
    # under test, not the number); the test set is never the one that selects
    argv = [str(pretrained), "--train", str(demo_shards["train"]), "--test", str(demo_shards["val"]),
            "--val", str(demo_shards["train"]), "--task", "demo", "--out", str(out), "--clips", "2", "--crops", "3",
            "--set", *TINY, "train.max_steps=4", "method.options.eval_every=2", "train.lr=3e-3"]
    assert main(["finetune", *argv]) == 0
    assert "top1" in capsys.readouterr().out
    vals = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in vals] == [2, 4]
    best = json.loads((out / "best.json").read_text())
    assert best["val_top1"] == max(v["val_top1"] for v in vals)
    assert best["step"] == min(v["step"] for v in vals if v["val_top1"] == best["val_top1"])
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["config"]["clips"] == 2 and report["config"]["crops"] == 3 and report["num_samples"] == 12
    assert report["config"]["selected_on"] == str(demo_shards["train"])
    assert {"top1", "top5", "mean_class_acc", "chance_top1", "confusion"} <= set(report)
    assert (out / "eval" / "report.html").is_file() and (out / "eval" / "report.md").is_file()

    # the saved folder is a complete model for the other commands, and the classifier reloads exactly
    import mmvssl
    assert mmvssl.load_model(out / "best").name == "video-tiny"
    model = load_classifier(out / "best")
    options = ExtractOptions(num_clips=2, num_crops=3)
    first = classify_shards(model, str(demo_shards["val"]), options)
    again = classify_shards(load_classifier(out / "best"), str(demo_shards["val"]), options)
    torch.testing.assert_close(first["scores"], again["scores"])
    # top-1 by hand with the reports' rule for ties (docs/evaluation.md): a clip counts when its
    # class beats every other by more than TIE_TOLERANCE; argmax would pick a member of a tie, and
    # which one depends on the last bits the CPU computed (a model of 4 steps may score classes alike)
    from mmvssl.evaluation.metrics import TIE_TOLERANCE
    scores, targets = first["scores"], first["targets"]
    own = scores.gather(1, targets[:, None])[:, 0]
    best_other = scores.scatter(1, targets[:, None], float("-inf")).amax(1)
    top1 = 100.0 * (own - best_other > TIE_TOLERANCE).float().mean().item()
    assert top1 == pytest.approx(report["top1"])
    assert main(["finetune", str(out / "best"), "--eval-only", "--test", str(demo_shards["val"]), "--out",
                 str(tmp_path / "again"), "--clips", "2", "--crops", "3"]) == 0
    # exact: both reports score the same saved folder through the same code in this process
    assert json.loads((tmp_path / "again" / "eval" / "report.json").read_text())["top1"] == report["top1"]


def test_fine_tuning_trains_the_video_encoder_only_and_lowers_the_loss(pretrained, demo_shards, tmp_path):
    """The head starts at zero (every class at 1/5: CE ln 5 on every clip); after 12 steps
    the CE over the training clips is lower, and of the saved model only the video encoder changed."""
    import math

    from mmvssl.commands.finetune import finetune_config
    from mmvssl.evaluation.classifier import classify_shards
    from mmvssl.models.classifier import load_classifier
    from mmvssl.models.presets import load_model
    from mmvssl.train.engine import pretrain
    cfg = finetune_config(str(pretrained), str(demo_shards["train"]), "demo", str(tmp_path),
                          overrides=[*TINY, "train.max_steps=12", "train.lr=1e-3", "method.options.layer_decay=1.0", "method.options.mixup=0",
                                     "method.options.cutmix=0", "data.augment.video=false"])
    final = pretrain(cfg)
    scored = classify_shards(load_classifier(final), str(demo_shards["train"]))
    ce = -scored["scores"].gather(1, scored["targets"][:, None]).log().mean().item()
    assert ce < math.log(5)  # the zero head started every clip at exactly ln 5
    before, after = load_model(pretrained).state_dict(), load_classifier(final).backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoders.video.") for k in changed)  # the projection head is untouched


def test_finetune_never_selects_on_the_test_set(pretrained, demo_shards, tmp_path, capsys):
    """Without --val the last checkpoint is tested (no best kept, `selected_on` null); a --val that
    shares a shard with --test, however spelt, is refused with one line before training."""
    from mmvssl.cli import main
    test = str(demo_shards["val"])
    base = [str(pretrained), "--train", str(demo_shards["train"]), "--test", test, "--task", "demo", "--clips", "1",
            "--crops", "1", "--set", *TINY, "train.max_steps=2", "method.options.eval_every=1"]
    one_shard = sorted(Path(test).glob("*.tar"))[0]
    for val in (test, test + "/", str(one_shard)):
        assert main(["finetune", *base, "--out", str(tmp_path / "refused"), "--val", val]) == 2
        err = capsys.readouterr().err
        assert "shares shards with --test" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "last"
    assert main(["finetune", *base, "--out", str(out)]) == 0
    assert "no --val: testing the last checkpoint" in capsys.readouterr().out
    assert not (out / "val.jsonl").exists() and not (out / "best").exists()
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["config"]["selected_on"] is None
