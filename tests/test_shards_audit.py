"""`mmvssl shards build | inspect | verify` from the command line."""

import json

import webdataset as wds

from mmvssl.cli import main


def test_build_inspect_verify(tmp_path, video_factory, capsys):
    video_factory(tmp_path / "v" / "a.mp4", seconds=2.0)
    video_factory(tmp_path / "v" / "b.mp4", seconds=1.0, audio_rate=None, size=(64, 48))
    (tmp_path / "v" / "bad.mp4").write_text("nope")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"video": "a.mp4", "caption": "first", "narrations": [{"start": 0, "end": 1, "text": "hi"}]},
        {"video": "b.mp4"}, {"video": "bad.mp4"}]) + "\n")
    out = tmp_path / "s"
    assert main(["shards", "build", str(tmp_path / "v"), "--captions", str(tmp_path / "c.jsonl"), "--out", str(out),
                 "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "inputs 3: accepted 2, rejected 1" in printed and "bad.mp4 (line 3)" in printed

    sheet = tmp_path / "sheet.png"
    assert main(["shards", "inspect", str(out), "--sheet", str(sheet)]) == 0
    printed = capsys.readouterr().out
    stats = json.loads(printed[: printed.rindex("}") + 1])
    assert stats["samples"] == 2 and stats["with_audio"] == 1 and stats["with_caption"] == 1
    assert stats["with_narrations"] == 1 and abs(stats["hours"] * 3600 - 3.0) < 0.3
    assert stats["resolutions"] == {"96x80": 1, "64x48": 1}
    assert sheet.stat().st_size > 1000

    assert main(["shards", "verify", str(out)]) == 0
    assert "checked 2 samples" in capsys.readouterr().out
    good = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))[0]
    with wds.TarWriter(str(tmp_path / "broken" / "x.tar") if (tmp_path / "broken").mkdir() is None else "") as w:
        w.write({"__key__": "ok", "mp4": good["mp4"], "json": good["json"]})
        w.write({"__key__": "cut", "mp4": good["mp4"][: len(good["mp4"]) // 2], "json": good["json"]})
    assert main(["shards", "verify", str(tmp_path / "broken")]) == 2
    captured = capsys.readouterr()
    assert "1 failed" in captured.out and "cut" in captured.out
