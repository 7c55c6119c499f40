"""Cached teacher features (`mmvssl shards add-features`, teacher.cached): they equal the online
teacher's features for the same frames, pair with the sampled frame times, resume, skip broken
samples with their reason, refuse another teacher, and train a distillation run without the teacher."""

from __future__ import annotations

import json
import math

import pytest
import torch
import webdataset as wds

from mmvssl.cli import main
from mmvssl.config import load_config
from mmvssl.data.loader import SampleSpec, build_loader
from mmvssl.teacher.cache import MEMBER, cached_times, decode_member, encode_member, nearest_indices
from mmvssl.errors import ConfigError, MmvsslError
from mmvssl.teacher.model import load_teacher, teacher_identity
from mmvssl.resources import data_path
from mmvssl.teacher.features import add_teacher_features, parse_teacher_spec
from tests.conftest import read_jsonl
from tests.helpers.tiny_teacher import save_tiny_teacher


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("teacher")
    arch, weights = save_tiny_teacher(root, seed=0)
    _, other = save_tiny_teacher(root, seed=1)
    return {"arch": arch, "pretrained": weights, "other": other}


@pytest.fixture(scope="module")
def val_features(teacher_files, demo_shards, tmp_path_factory):
    """The demo val shards (12 samples of 3 s in 2 shards) with features at 4 frames/s, frames decoded at 32 px."""
    out = tmp_path_factory.mktemp("features") / "val"
    report = add_teacher_features(teacher_files["arch"], teacher_files["pretrained"], str(demo_shards["val"]), out,
                                  fps=4.0, size=32, batch_size=10, device="cpu", progress=False)
    return out, report


def _samples(folder) -> list[dict]:
    return list(wds.WebDataset(sorted(map(str, folder.glob("*.tar"))), shardshuffle=False))


def _samples_of(shard) -> list[dict]:
    return list(wds.WebDataset(str(shard), shardshuffle=False))


def test_cached_features_equal_the_online_teacher_and_every_member_is_copied(teacher_files, demo_shards,
                                                                             val_features):
    out, report = val_features
    identity = teacher_identity(teacher_files["arch"], teacher_files["pretrained"])
    assert report["teacher"] == identity and identity["image_size"] == 32 and identity["embed_dim"] == 16
    before, after = _samples(demo_shards["val"]), _samples(out)
    assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
    for a, b in zip(before, after):
        assert {k: v for k, v in b.items() if not k.startswith("__") and k != MEMBER} == \
               {k: v for k, v in a.items() if not k.startswith("__")}
        features, times, meta = decode_member(b[MEMBER])
        assert features.dtype == torch.float16 and features.shape == (12, 16)  # 3 s at 4 frames/s
        assert times.tolist() == [i / 4 for i in range(12)] and meta["fps"] == "4.0"
    # centre windows of 4 frames at 4 frames/s in 3 s videos start at 1.0 s: on the cached grid
    teacher = load_teacher(teacher_files["arch"], teacher_files["pretrained"])
    spec = SampleSpec(num_frames=4, fps=4.0, size=32, train=False, teacher_features=identity)
    batches = list(build_loader(str(out), spec, batch_size=6, mode="epoch"))
    assert sum(len(b["key"]) for b in batches) == 12
    for batch in batches:
        assert [m["window"] for m in batch["meta"]] == [[1.0, 2.0]] * len(batch["key"])
        online = teacher(batch["video"])["teacher_frames"]  # (B, T, D)
        assert batch["teacher_frames"].shape == online.shape == (len(batch["key"]), 4, 16)
        torch.testing.assert_close(batch["teacher_frames"], online, rtol=2e-3, atol=2e-3)  # fp16 storage
        # the comparison can fail: neighbouring frames differ by far more than the tolerance
        assert (online[:, 1:] - online[:, :-1]).abs().amax() > 0.05


def test_pairing_picks_the_nearest_cached_time():
    times = cached_times(3.0, 4.0)  # 0, 0.25, ..., 2.75
    assert len(times) == 12 and cached_times(2.9, 4.0)[-1] == 2.75 and len(cached_times(0.1, 4.0)) == 1
    sampled = torch.tensor([0.1, 0.13, 0.37, 0.38, 2.9, 3.5], dtype=torch.float64)
    # 3.5 is past the end: the decoder holds the last frame, so it pairs with the last cached one
    assert nearest_indices(times, sampled, 3.0, 4.0).tolist() == [0, 1, 1, 2, 11, 11]
    with pytest.raises(ValueError, match="2.000 s"):
        nearest_indices(cached_times(1.0, 4.0), torch.tensor([0.5, 2.0]), 3.0, 4.0)  # features of 1 s only


def test_the_loader_pairs_each_sampled_frame_with_its_cached_time(teacher_files, val_features, tmp_path):
    """Features whose row j holds j: every batch row must hold the index of the nearest cached time."""
    out, report = val_features
    identity = report["teacher"]
    folder = tmp_path / "indexed"
    folder.mkdir()
    with wds.TarWriter(str(folder / "shard-000000.tar"), encoder=False) as writer:
        for s in _samples(out):
            features, times, meta = decode_member(s[MEMBER])
            index = torch.arange(len(times), dtype=torch.float32)[:, None].expand(-1, features.shape[1])
            s[MEMBER] = encode_member(index, times, identity, 4.0, 32, float(meta["duration"]))
            writer.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
    spec = SampleSpec(num_frames=5, fps=3.0, size=32, train=True, seed=3, teacher_features=identity)
    batch = next(iter(build_loader(str(folder), spec, batch_size=8)))
    for row, meta in zip(batch["teacher_frames"], batch["meta"]):
        start, end = meta["window"]
        expected = [min(11, round(4 * (start + i * (end - start) / 5))) for i in range(5)]
        assert row[:, 0].tolist() == expected
    assert len({tuple(r[:, 0].tolist()) for r in batch["teacher_frames"]}) > 1  # random windows differ


def test_rerun_resumes_and_another_teacher_is_refused(teacher_files, demo_shards, tmp_path):
    out = tmp_path / "out"
    kwargs = {"fps": 2.0, "size": 32, "device": "cpu", "progress": False}
    first = add_teacher_features(teacher_files["arch"], teacher_files["pretrained"], str(demo_shards["val"]), out,
                                 **kwargs)
    assert first["done_before"] == [] and set(first["shards"]) == {"shard-000000.tar", "shard-000001.tar"}
    kept = (out / "shard-000000.tar").stat().st_mtime_ns
    before = {s["__key__"]: s[MEMBER] for s in _samples_of(out / "shard-000001.tar")}
    (out / "shard-000001.tar").unlink()  # as if interrupted while writing it
    (out / "shard-000001.tar.partial").write_bytes(b"half a shard")
    again = add_teacher_features(teacher_files["arch"], teacher_files["pretrained"], str(demo_shards["val"]), out,
                                 **kwargs)
    assert again["done_before"] == ["shard-000000.tar"]
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept and not (out / "shard-000001.tar.partial").exists()
    redone = {s["__key__"]: s[MEMBER] for s in _samples_of(out / "shard-000001.tar")}
    assert len(redone) == 4 and redone.keys() == before.keys()
    # the same features, bit for bit (safetensors orders metadata at random): each shard's frames go
    # to the teacher in the same batches on both runs, the same ops on the same inputs in one process
    for key, member in redone.items():
        assert torch.equal(decode_member(member)[0], decode_member(before[key])[0])
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 8, "shard-000001.tar": 4}
    with pytest.raises(MmvsslError, match="holds features of teacher.*--overwrite"):
        add_teacher_features(teacher_files["arch"], teacher_files["other"], str(demo_shards["val"]), out, **kwargs)
    with pytest.raises(MmvsslError, match="holds features"):
        add_teacher_features(teacher_files["arch"], teacher_files["pretrained"], str(demo_shards["val"]), out,
                             **{**kwargs, "fps": 4.0})


def test_a_broken_sample_is_skipped_with_its_key_and_reason(teacher_files, demo_shards, tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    samples = _samples(demo_shards["val"])[:4]
    samples[1]["mp4"] = b"not a video at all"
    samples[2]["json"] = b"{broken"
    samples.append({"__key__": "failed-download", "json": b'{"status": "failed_to_download"}'})  # video2dataset
    with wds.TarWriter(str(source / "shard-000000.tar"), encoder=False) as writer:
        for s in samples:
            writer.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
    spec = f"{teacher_files['arch']}:{teacher_files['pretrained']}"
    assert main(["shards", "add-features", spec, "--shards", str(source), "--out", str(tmp_path / "out"),
                 "--fps", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "2 skipped" in printed and f"skipped shard-000000.tar {samples[1]['__key__']}: not a readable media" \
        in printed
    report = json.loads((tmp_path / "out" / "features_report.json").read_text())
    skipped = report["shards"]["shard-000000.tar"]["skipped"]
    assert [s["key"] for s in skipped] == [samples[1]["__key__"], samples[2]["__key__"]]
    assert "media file" in skipped[0]["reason"] and skipped[1]["reason"]
    assert report["shards"]["shard-000000.tar"]["without_video"] == 1
    written = _samples(tmp_path / "out")
    assert [s["__key__"] for s in written] == [samples[0]["__key__"], samples[3]["__key__"], "failed-download"]
    assert MEMBER in written[0] and MEMBER not in written[2] and written[2]["json"] == samples[4]["json"]


def test_teacher_spec_forms(tmp_path):
    assert parse_teacher_spec("ViT-B-32:openai") == ("ViT-B-32", "openai", 0)
    assert parse_teacher_spec("hf-hub:org/repo") == ("hf-hub:org/repo", "", 0)
    assert parse_teacher_spec("/m/tiny.json:/w/tiny.pt") == ("/m/tiny.json", "/w/tiny.pt", 0)
    config = tmp_path / "exp.yaml"
    config.write_text("teacher: {arch: ViT-B-16, pretrained: laion2b_s34b_b88k, image_size: 160}\n")
    assert parse_teacher_spec(str(config)) == ("ViT-B-16", "laion2b_s34b_b88k", 160)


def test_missing_or_foreign_features_are_named(teacher_files, demo_shards, val_features, tmp_path):
    out, report = val_features
    foreign = teacher_identity(teacher_files["arch"], teacher_files["other"])
    spec = SampleSpec(num_frames=4, fps=4.0, size=32, train=False, teacher_features=foreign)
    with pytest.raises(MmvsslError, match=r"shard-000000.tar: sample 000000\d+: cached features come from teacher "
                                          r"mmvssl-tiny-teacher \(pretrained 'tiny_teacher_seed0.pt'") as e:
        next(iter(build_loader(str(out), spec, batch_size=2, mode="epoch")))
    assert "\n" not in str(e.value)
    spec.teacher_features = report["teacher"]
    with pytest.raises(MmvsslError, match=r"sample 0+\d+ has no cached teacher features.*add-features"):
        next(iter(build_loader(str(demo_shards["val"]), spec, batch_size=2, mode="epoch")))
    # before training: the folder's report names the teacher (one line, naming the folder)
    cfg = load_config(data_path("configs", "demo", "distill.yaml"), [
        f"data.shards={out}", f"teacher.arch={teacher_files['arch']}", f"teacher.pretrained={teacher_files['other']}",
        "teacher.cached=true", f"train.output_dir={tmp_path / 'run'}", "train.log_with=none"])
    from mmvssl.train.engine import pretrain
    with pytest.raises(ConfigError, match=f"features in {out} come from teacher.*tiny_teacher_seed0.pt.*config "
                                          f"names.*tiny_teacher_seed1.pt") as e:
        pretrain(cfg)
    assert "\n" not in str(e.value)


def test_pretrain_with_cached_features_never_runs_the_teacher(teacher_files, demo_shards, tmp_path, monkeypatch):
    out = tmp_path / "train"
    add_teacher_features(teacher_files["arch"], teacher_files["pretrained"], str(demo_shards["train"]), out,
                         fps=4.0, device="cpu", progress=False)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded although its features are cached")
    monkeypatch.setattr("mmvssl.teacher.model.load_teacher", no_teacher)
    from mmvssl.train.engine import pretrain
    cfg = load_config(data_path("configs", "demo", "distill.yaml"), [
        f"data.shards={out}", "data.batch_size=4", "data.num_workers=0", "train.max_steps=2", "train.log_every=1",
        "train.save_every=0", "train.warmup_steps=1", "train.log_with=none", f"train.output_dir={tmp_path / 'run'}",
        f"teacher.arch={teacher_files['arch']}", f"teacher.pretrained={teacher_files['pretrained']}",
        "teacher.cached=true"])
    pretrain(cfg)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        distill = {k: v for k, v in r.items() if "distill" in k}
        assert set(distill) == {"frame_distill", "clip_distill"} and all(math.isfinite(v) and v > 0
                                                                         for v in distill.values())
        # the logged total is the config's weighted sum of the four terms
        assert r["loss"] == pytest.approx(sum(t.weight * r[t.name] for t in cfg.objective.terms), rel=1e-5)
