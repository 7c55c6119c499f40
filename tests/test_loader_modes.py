"""Loader modes: epoch split over processes and workers (torchrun), fixed-length resampled
epochs, weighted mixing of shard sets, video2dataset shards, multi-view samplers, augmentation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds

from mmvssl.data.augment import AugmentOptions
from mmvssl.data.loader import SampleSpec, build_loader, list_shards
from mmvssl.data.shardio import EpochSamples, parse_sources, shard_size, slot_range

SPEC = dict(num_frames=2, fps=2.0, size=16, audio_rate=8000, context_length=8, num_candidates=2)


def _all_keys(demo_shards):
    report = json.loads((demo_shards["train"] / "build_report.json").read_text())
    return sorted(a["key"] for a in report["accepted"])


def test_epoch_split_covers_every_sample_once_over_uneven_slots(demo_shards, monkeypatch):
    """3 shards (8, 8, 8 samples) over 5 slots: every sample once, slots differ by <= 1."""
    sets = parse_sources(str(demo_shards["train"]))
    source = EpochSamples(sets, seed=0, shuffle=True)
    per_slot = []
    for rank in range(5):
        monkeypatch.setattr(wds.utils, "pytorch_worker_info", lambda rank=rank: (rank, 5, 0, 1))
        per_slot.append([raw["__key__"] for raw in source])
    keys = [k for slot in per_slot for k in slot]
    assert sorted(keys) == _all_keys(demo_shards)
    assert max(map(len, per_slot)) - min(map(len, per_slot)) <= 1
    assert slot_range(10, 3, 4) == (7, 10)


def test_epoch_mode_training_order_is_seeded_and_changes_per_epoch(demo_shards):
    spec = SampleSpec(**SPEC, train=True, seed=2)
    run = lambda epoch: [k for b in build_loader(str(demo_shards["train"]), spec, 4, mode="epoch", epoch=epoch)
                         for k in b["key"]]
    first, again, second = run(0), run(0), run(1)
    assert first == again and first != second and sorted(first) == sorted(second) == _all_keys(demo_shards)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on linux")
def test_torchrun_two_processes_two_workers_read_each_sample_once(demo_shards, tmp_path):
    helper = Path(__file__).parent / "helpers_data" / "epoch_ranks.py"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", str(helper),
                             str(demo_shards["train"]), str(tmp_path)], capture_output=True, text=True, timeout=180,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    keys = [k for r in (0, 1) for k in json.loads((tmp_path / f"rank{r}.json").read_text())]
    assert sorted(keys) == _all_keys(demo_shards)


def test_resampled_epoch_length(demo_shards):
    loader = build_loader(str(demo_shards["train"]), SampleSpec(**SPEC, train=True), 2, epoch_length=5)
    assert len(list(loader)) == 5


def _video2dataset_shard(tmp_path, demo_shards):
    """video2dataset's layout: .mp4 + .txt + .json (url, status, no duration); failed
    downloads keep only .json with status failed_to_download."""
    good = list(wds.WebDataset(list_shards(str(demo_shards["val"])), shardshuffle=False))[:3]
    path = tmp_path / "00000.tar"
    with wds.TarWriter(str(path)) as w:
        for i, s in enumerate(good):
            w.write({"__key__": f"0000{i}", "mp4": s["mp4"], "txt": f"caption {i}".encode(),
                     "json": json.dumps({"url": f"http://x/{i}", "key": f"0000{i}", "status": "success"}).encode()})
            w.write({"__key__": f"0001{i}", "json": json.dumps({"url": "http://x/bad", "status": "failed_to_download",
                                                                 "error_message": "404"}).encode()})
    return path


def test_reads_video2dataset_shards_and_mixes_sets_by_weight(tmp_path, demo_shards):
    v2d = _video2dataset_shard(tmp_path, demo_shards)
    assert shard_size(str(v2d)) == 6
    batch = next(iter(build_loader(str(v2d), SampleSpec(**SPEC, train=False), 8)))
    assert batch["key"] == ["00000", "00001", "00002"] and int(batch["failed"]) == 0
    assert batch["meta"][0]["caption"] == "caption 0"
    spec = f"demo={demo_shards['train']}@3;v2d={v2d}@1"
    loader = iter(build_loader(spec, SampleSpec(**SPEC, train=True, seed=1), 8, shuffle_buffer=1))
    sources = [m["source_set"] for _ in range(5) for m in next(loader)["meta"]]
    assert set(sources) == {"demo", "v2d"} and sources.count("demo") > sources.count("v2d")


def test_silent_samples_are_masked_not_invented(tmp_path, video_factory):
    from mmvssl.data.shards import build_shards
    video_factory(tmp_path / "v" / "a.mp4", seconds=2.0, audio_rate=None)
    build_shards(tmp_path / "v", tmp_path / "s")
    batch = next(iter(build_loader(str(tmp_path / "s"), SampleSpec(**SPEC, train=False), 2)))
    assert not batch["has_audio"][0] and not batch["has_text"][0] and batch["audio"].abs().max() == 0


@pytest.mark.parametrize("sampler, views", [("cvrl", 2), ("teg", 2), ("svt", 4), ("uniform", 3)])
def test_multi_view_batches(demo_shards, sampler, views):
    spec = SampleSpec(**SPEC, train=True, sampler=sampler, num_clips=3)
    batch = next(iter(build_loader(str(demo_shards["train"]), spec, 2)))
    # svt: the globals in `video`, the locals in the group video/local; teg: the short clip in `video`, the
    # long one (2x as long at the same rate: 2x the frames) in the group video/long
    stacked = {"svt": 2, "teg": 1}.get(sampler, views)
    assert batch["video"].shape == (2, stacked, 3, 2, 16, 16)
    assert batch["view_times"].shape == (2, views, 2) and batch["view_crops"].shape == (2, views, 4)
    if sampler == "svt":
        assert batch["video/local"].shape == (2, 2, 3, 2, 16, 16)
    if sampler == "teg":
        assert batch["video/long"].shape == (2, 1, 3, 4, 16, 16)
        (ss, se), (ls, le) = batch["view_times"][0].tolist()
        assert ls <= ss and se <= le + 1e-6 and le - ls == pytest.approx(2 * (se - ss))


def test_svt_local_views_travel_as_a_group_of_their_own_size_frames_and_crops(demo_shards):
    from mmvssl.train.step import split_batch
    spec = SampleSpec(**{**SPEC, "num_frames": 4}, train=True, sampler="svt", num_global=2, num_local=3,
                      local_size=8, local_frames=2, augment=AugmentOptions(video=True, crop_scale=(0.4, 1.0),
                                                                          local_crop_scale=(0.05, 0.4)))
    batch = next(iter(build_loader(str(demo_shards["train"]), spec, 4)))
    assert batch["video"].shape == (4, 2, 3, 4, 16, 16) and batch["video/local"].shape == (4, 3, 3, 2, 8, 8)
    length = batch["view_times"][..., 1] - batch["view_times"][..., 0]  # (B, 5): globals then locals
    clip = 2 * spec.window  # SVT cuts every view from one clip: globals nearly all of it, locals an eighth
    torch.testing.assert_close(length[:, :2], torch.full((4, 2), clip * (1 - 5 / 256), dtype=torch.float64))
    torch.testing.assert_close(length[:, 2:], torch.full((4, 3), clip / 8, dtype=torch.float64))
    crops = batch["view_crops"]
    area = (crops[..., 2] - crops[..., 0]) * (crops[..., 3] - crops[..., 1])  # share of the decoded frame
    assert (area[:, :2] > 0.4 - 0.05).all() and (area[:, 2:] < 0.4 + 0.05).all()  # integer pixel rounding
    halves = split_batch(batch, 2)  # a micro-batch split cuts the group and the view tensors too
    assert halves[1]["video/local"].shape == (2, 3, 3, 2, 8, 8) and torch.equal(halves[1]["view_times"],
                                                                                  batch["view_times"][2:])


def test_augmentation_is_off_by_default_and_consistent_over_time(demo_shards):
    aug = AugmentOptions(video=True, audio=True, flip=1.0, grayscale=1.0)
    spec = SampleSpec(**SPEC, train=True, seed=0, augment=aug)
    batch = next(iter(build_loader(str(demo_shards["train"]), spec, 2)))
    assert batch["video"].shape == (2, 3, 2, 16, 16)
    v = batch["video"][0]
    assert torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])  # grey in every frame
    again = next(iter(build_loader(str(demo_shards["train"]), spec, 2)))
    assert torch.equal(again["video"], batch["video"]) and torch.equal(again["audio"], batch["audio"])


def test_labelled_share_is_refused_in_epoch_mode_not_ignored(demo_shards):
    """data.labelled_share draws labelled samples at a share of a resampled stream; in epoch mode
    (every sample once) it would be silently ignored, so it is refused with one line naming it."""
    from mmvssl.errors import MmvsslError
    keys = frozenset(_all_keys(demo_shards)[:4])
    spec = SampleSpec(**SPEC, train=True, seed=0, labelled_share=0.5, labelled_keys=keys)
    with pytest.raises(MmvsslError, match=r"data\.labelled_share=0\.5 .* data\.mode=epoch") as e:
        next(iter(build_loader(str(demo_shards["train"]), spec, 4, mode="epoch")))
    assert "\n" not in str(e.value)
    spec.labelled_share = 0.0  # each sample once per epoch, labelled or not
    assert len([k for b in build_loader(str(demo_shards["train"]), spec, 4, mode="epoch") for k in b["key"]]) == 24
