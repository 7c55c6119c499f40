import json
import os
import pickle

import pytest
import torch
import webdataset as wds

from mmvssl.data.loader import SampleSpec, build_loader, list_shards
from mmvssl.errors import MmvsslError

SPEC = dict(num_frames=4, fps=2.0, size=32, audio_rate=8000, context_length=16, num_candidates=2)


def test_batch_follows_the_contract(demo_shards):
    loader = build_loader(str(demo_shards["train"]), SampleSpec(**SPEC, train=True, seed=0), batch_size=5)
    batch = next(iter(loader))
    assert batch["video"].shape == (5, 3, 4, 32, 32) and batch["video"].dtype == torch.float32
    assert batch["audio"].shape == (5, 16000) and batch["audio"].dtype == torch.float32
    assert batch["text"].shape == (5, 2, 16) and batch["text"].dtype == torch.int64
    assert batch["text_mask"].all() and batch["has_audio"].all() and batch["has_text"].all()
    assert len(batch["key"]) == 5 and len(batch["meta"]) == 5
    for meta in batch["meta"]:
        start, end = meta["window"]
        assert end - start == pytest.approx(2.0) and 0 <= start <= meta["duration"] - 2.0 + 1e-6
    assert batch["audio"].abs().max() > 0.05  # the sounds are really there


def test_training_stream_is_seeded(demo_shards):
    keys = []
    for _ in range(2):
        loader = build_loader(str(demo_shards["train"]), SampleSpec(**SPEC, train=True, seed=3), batch_size=4)
        it = iter(loader)
        keys.append([next(it)["key"] for _ in range(3)])
    assert keys[0] == keys[1]
    other = iter(build_loader(str(demo_shards["train"]), SampleSpec(**SPEC, train=True, seed=4), batch_size=4))
    assert [next(other)["key"] for _ in range(3)] != keys[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_reads_every_sample_once(demo_shards, workers):
    loader = build_loader(str(demo_shards["val"]), SampleSpec(**SPEC, train=False), batch_size=5, num_workers=workers)
    keys = [k for batch in loader for k in batch["key"]]
    report = json.loads((demo_shards["val"] / "build_report.json").read_text())
    assert sorted(keys) == sorted(a["key"] for a in report["accepted"])


def _mixed_shard(tmp_path, demo_shards, marker):
    """A shard with two good samples, a corrupt one, one without audio metadata, and a
    pickle member whose unpickling would create `marker`."""
    good = [s for s in wds.WebDataset(list_shards(str(demo_shards["val"])), shardshuffle=False)][:2]
    path = tmp_path / "mixed.tar"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "a", "mp4": good[0]["mp4"], "json": good[0]["json"], "pyd": pickle.dumps(Evil())})
        w.write({"__key__": "b", "mp4": b"\x00\x00\x00 garbage that is not a video" * 20, "json": b"{}"})
        w.write({"__key__": "c", "mp4": good[1]["mp4"], "txt": b"only a txt caption"})
    return path


def test_corrupt_samples_are_skipped_and_counted_and_pickles_never_run(tmp_path, demo_shards):
    marker = tmp_path / "pwned"
    shard = _mixed_shard(tmp_path, demo_shards, marker)
    batches = list(build_loader(str(shard), SampleSpec(**SPEC, train=False), batch_size=8))
    assert len(batches) == 1
    batch = batches[0]
    assert batch["key"] == ["a", "c"]
    assert int(batch["failed"]) == 1
    assert not marker.exists()
    assert batch["meta"][1]["caption"] == "only a txt caption"
    assert batch["text_mask"][1].tolist() == [True, False]  # one text, the second candidate is masked


def test_too_many_failures_stop_with_the_shard_named(tmp_path):
    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(60):
            w.write({"__key__": f"k{i}", "mp4": b"not a video", "json": b"{}"})
    with pytest.raises(MmvsslError, match=r"50 of 50 samples failed.*bad\.tar"):
        list(build_loader(str(path), SampleSpec(**SPEC, train=False), batch_size=8, max_error_rate=0.5))


@pytest.mark.parametrize("train", [False, True])
def test_an_unreadable_shard_is_reported_once_on_one_line_and_skipped(tmp_path, demo_shards, capsys, train):
    import shutil
    good = sorted(demo_shards["val"].glob("*.tar"))
    for shard in good:
        shutil.copy(shard, tmp_path / shard.name)
    (tmp_path / "zz-garbage.tar").write_bytes(os.urandom(3000))  # not a tar at all
    expected = {k for shard in good for k in (s["__key__"] for s in wds.WebDataset(str(shard), shardshuffle=False))}
    loader = build_loader(str(tmp_path), SampleSpec(**SPEC, train=train, seed=0), batch_size=4)
    if train:  # the endless stream draws the garbage shard again and again
        keys = {k for _, batch in zip(range(12), loader) for k in batch["key"]}
        assert keys <= expected and len(keys) > 4
    else:
        assert sorted(k for batch in loader for k in batch["key"]) == sorted(expected)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmvssl: warning: skipped unreadable shard ")
    assert "zz-garbage.tar" in lines[0] and "Traceback" not in lines[0]


def test_list_shards_errors_name_the_path(tmp_path):
    with pytest.raises(MmvsslError, match="shard not found: .*nope.tar"):
        list_shards(str(tmp_path / "nope.tar"))
    with pytest.raises(MmvsslError, match="no .tar shards in folder"):
        list_shards(str(tmp_path))


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_with_the_same_batches(demo_shards, workers):
    spec = SampleSpec(**SPEC, train=True, seed=5)
    full = iter(build_loader(str(demo_shards["train"]), spec, batch_size=3, num_workers=workers))
    batches = [next(full) for _ in range(5)]
    resumed = iter(build_loader(str(demo_shards["train"]), spec, batch_size=3, num_workers=workers, start_batch=3))
    for expected in batches[3:]:
        got = next(resumed)
        assert got["key"] == expected["key"]
        # exact: the same bytes through the same decoder, seeded draws and per-sample ops in one machine
        assert torch.equal(got["video"], expected["video"]) and torch.equal(got["audio"], expected["audio"])
