import json
import tarfile

import pytest
import webdataset as wds

from mmvssl.data.shards import build_shards
from mmvssl.errors import MmvsslError


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_build_accepts_good_videos_and_rejects_bad_ones_with_reasons(tmp_path, video_factory):
    src = tmp_path / "videos"
    video_factory(src / "good.mp4", seconds=2.0)
    video_factory(src / "silent.mp4", seconds=2.0, audio_rate=None)
    video_factory(src / "clip.webm", seconds=2.0, codec="libvpx-vp9", container_format="webm", audio_rate=None)
    (src / "empty.mp4").write_bytes(b"")
    (src / "text.mp4").write_text("definitely not a video\n" * 50)
    good = (src / "good.mp4").read_bytes()
    (src / "truncated.mp4").write_bytes(good[: len(good) // 3])
    captions = tmp_path / "captions.jsonl"
    _write_jsonl(captions, [
        {"video": "good.mp4", "caption": "a tone", "narrations": [{"start": 0, "end": 1, "text": "beep"}],
         "label": "tone", "speaker": "me"},
        {"video": "silent.mp4", "caption": "nothing to hear"},
        {"video": "clip.webm"},
        {"video": "empty.mp4"},
        {"video": "text.mp4", "caption": "x"},
        {"video": "truncated.mp4"},
        {"video": "missing.mp4"},
        '{"video": "good.mp4", broken json',
        {"caption": "no video key"},
        {"video": "good.mp4", "caption": "again"},
        {"video": "silent.mp4", "narrations": [{"start": 2, "end": 1, "text": "backwards"}]},
    ])
    report = build_shards(src, tmp_path / "shards", captions=captions, samples_per_shard=2)

    assert report["num_accepted"] + report["num_rejected"] == 11  # every line accounted for
    assert [a["source"] for a in report["accepted"]] == ["good.mp4", "silent.mp4", "clip.webm"]
    reasons = {(r["source"], r.get("line")): r["reason"] for r in report["rejected"]}
    assert reasons[("empty.mp4", 4)] == "empty file (0 bytes)"
    assert "not a readable media file" in reasons[("text.mp4", 5)]
    assert ("truncated.mp4", 6) in reasons
    assert reasons[("missing.mp4", 7)] == "file not found"
    assert "malformed JSON" in reasons[(f"{captions}:8", 8)]
    assert "no 'video'" in reasons[(f"{captions}:9", 9)]
    assert reasons[("good.mp4", 10)] == "duplicate entry of line 1"
    assert "narrations" in reasons[(f"{captions}:11", 11)]
    on_disk = json.loads((tmp_path / "shards" / "build_report.json").read_text())
    assert on_disk["num_rejected"] == 8

    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 2, "shard-000001.tar": 1}
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert sorted(names) == ["000000000.json", "000000000.mp4", "000000000.txt", "000000001.json",
                             "000000001.mp4", "000000001.txt"]

    samples = {s["__key__"]: s for s in wds.WebDataset(sorted(map(str, (tmp_path / "shards").glob("*.tar"))),
                                                        shardshuffle=False)}
    first = samples["000000000"]
    assert first["mp4"] == good  # original bytes, untouched
    meta = json.loads(first["json"])
    assert meta["caption"] == "a tone" and meta["speaker"] == "me" and meta["label"] == "tone"
    assert meta["has_audio"] and meta["sample_rate"] == 16000 and abs(meta["duration"] - 2.0) < 0.15
    assert json.loads(samples["000000001"]["json"])["has_audio"] is False
    assert json.loads(samples["000000002"]["json"])["video_codec"] == "vp9"


def test_without_captions_every_video_in_the_folder_is_used(tmp_path, video_factory):
    video_factory(tmp_path / "v" / "a.mp4", seconds=1.0)
    video_factory(tmp_path / "v" / "sub" / "b.mp4", seconds=1.0)
    (tmp_path / "v" / "notes.txt").write_text("ignored")
    report = build_shards(tmp_path / "v", tmp_path / "out")
    assert sorted(a["source"] for a in report["accepted"]) == ["a.mp4", "sub/b.mp4"]


def test_csv_captions(tmp_path, video_factory):
    video_factory(tmp_path / "v" / "a.mp4", seconds=1.0)
    (tmp_path / "c.csv").write_text('video,caption,narrations\na.mp4,hello,"[{""start"": 0, ""end"": 1, ""text"": ""hi""}]"\n')
    report = build_shards(tmp_path / "v", tmp_path / "out", captions=tmp_path / "c.csv")
    assert report["num_accepted"] == 1


def test_overwrite_replaces_old_shards_only(tmp_path, video_factory):
    video_factory(tmp_path / "v" / "a.mp4", seconds=1.0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "shard-000009.tar").write_bytes(b"stale")
    with pytest.raises(MmvsslError, match="--overwrite"):
        build_shards(tmp_path / "v", out)
    build_shards(tmp_path / "v", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["build_report.json", "keep.txt", "shard-000000.tar", "sizes.json"]
