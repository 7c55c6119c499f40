"""The shard rewriter (mmvssl/data/rewrite.py) and the raw-sample helpers (mmvssl/data/rawsample.py)."""

import json

import pytest
import webdataset as wds

from mmvssl.data.decode import DecodeError
from mmvssl.data.rawsample import is_failed_download, metadata, read_shard, stored_members, video_bytes, video_member
from mmvssl.data.rewrite import ShardRewriter, shard_parts
from mmvssl.errors import MmvsslError


def _write_shards(folder, counts):
    folder.mkdir(parents=True)
    urls = []
    for s, n in enumerate(counts):
        url = str(folder / f"shard-{s:06d}.tar")
        with wds.TarWriter(url, encoder=False) as w:
            for i in range(n):
                w.write({"__key__": f"{s:03d}{i:06d}", "mp4": bytes([s, i]) * 10,
                         "json": json.dumps({"i": i}).encode(), "notes.txt.gz": b"\x1f\x8b raw"})
        urls.append(url)
    return urls


def _rewrite(urls, out, header=None, fail_on=None, **kw):
    rw = ShardRewriter(out, "test_report.json", header or {"settings": {"x": 1}}, inputs=urls, counts=("bytes",), **kw)
    for context in rw.pending(shard_parts(urls, kw.pop("per_shard", None))):
        with context as shard:
            for raw in shard.part.samples():
                if raw["__key__"] == fail_on:
                    raise RuntimeError("interrupted")
                if raw["__key__"].endswith("1"):
                    shard.skip(raw, "odd key")
                    continue
                shard.write(raw, {"extra.bin": raw["mp4"][::-1]})
                shard.count("bytes", len(raw["mp4"]))
    return rw


def test_rewrite_copies_members_byte_for_byte_and_reports(tmp_path):
    urls = _write_shards(tmp_path / "in", [3, 2])
    rw = _rewrite(urls, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "test_report.json").read_text())
    assert report["settings"] == {"x": 1} and set(report["shards"]) == {"shard-000000.tar", "shard-000001.tar"}
    first = report["shards"]["shard-000000.tar"]
    assert first["samples"] == 2 and first["bytes"] == 40 and first["skipped"] == [{"key": "000000001",
                                                                                      "reason": "odd key"}]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"shard-000000.tar": 2, "shard-000001.tar": 1}
    assert rw.totals("bytes") == {"samples": 3, "skipped": 2, "bytes": 60}
    before = {r["__key__"]: r for u in urls for r in read_shard(u)}
    after = [r for u in sorted((tmp_path / "out").glob("*.tar")) for r in read_shard(str(u))]
    assert [r["__key__"] for r in after] == ["000000000", "000000002", "001000000"]
    for new in after:
        old = stored_members(before[new["__key__"]])
        assert {k: new[k] for k in old} == old  # the .gz member is not compressed again
        assert new["extra.bin"] == old["mp4"][::-1]


def test_rewrite_resumes_redoes_an_interrupted_shard_and_refuses_other_settings(tmp_path):
    urls = _write_shards(tmp_path / "in", [2, 2])
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"):
        _rewrite(urls, out, fail_on="001000000")
    assert (out / "shard-000000.tar").is_file() and not list(out.glob("*.partial"))
    assert set(json.loads((out / "test_report.json").read_text())["shards"]) == {"shard-000000.tar"}
    kept = (out / "shard-000000.tar").stat().st_mtime_ns
    (out / "shard-000001.tar.partial").write_bytes(b"half a shard")
    again = _rewrite(urls, out)
    assert again.done_before == ["shard-000000.tar"] and (out / "shard-000000.tar").stat().st_mtime_ns == kept
    assert not (out / "shard-000001.tar.partial").exists() and again.totals()["samples"] == 2
    with pytest.raises(MmvsslError, match=r'was written with \{"settings": \{"x": 1\}\}.*--overwrite'):
        _rewrite(urls, out, header={"settings": {"x": 2}})
    redone = _rewrite(urls, out, header={"settings": {"x": 2}}, overwrite=True)
    assert redone.done_before == [] and json.loads((out / "test_report.json").read_text())["settings"] == {"x": 2}
    with pytest.raises(MmvsslError, match="input shard folder"):
        _rewrite(urls, tmp_path / "in")


def test_rewrite_cuts_a_stream_into_shards_of_n_samples(tmp_path):
    urls = _write_shards(tmp_path / "in", [3, 4])
    rw = ShardRewriter(tmp_path / "out", "r.json", {}, inputs=urls)
    for context in rw.pending(shard_parts(urls, samples_per_shard=3)):
        with context as shard:
            for raw in shard.part.samples():
                shard.write(raw)
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    (tmp_path / "out" / "shard-000001.tar").unlink()
    again = ShardRewriter(tmp_path / "out", "r.json", {}, inputs=urls)
    keys = []
    for context in again.pending(shard_parts(urls, samples_per_shard=3)):
        with context as shard:
            keys += [raw["__key__"] for raw in shard.part.samples()]
            shard.result["samples"] = len(keys)
    assert keys == ["001000000", "001000001", "001000002"]  # the second part only, from the same place


def test_an_unreadable_shard_is_named(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"\x00" * 10 + b"not a tar" * 100)
    with pytest.raises(MmvsslError, match="bad.tar: unreadable shard"):
        list(read_shard(str(tmp_path / "bad.tar")))


def test_raw_sample_helpers():
    raw = {"__key__": "k1", "__url__": "u", "webm": b"v", "json": b'{"a": 1}', "txt": b" cap "}
    assert video_member(raw) == "webm" and video_bytes(raw) == b"v"
    assert metadata(raw) == {"a": 1} and metadata(raw, with_caption=True) == {"a": 1, "caption": "cap"}
    assert stored_members(raw) == {"webm": b"v", "json": b'{"a": 1}', "txt": b" cap "}
    with pytest.raises(DecodeError, match="sample k2 has no video member"):
        video_bytes({"__key__": "k2"})
    with pytest.raises(DecodeError, match="sample k3: metadata is not JSON"):
        metadata({"__key__": "k3", "json": b"{nope"})
    with pytest.raises(DecodeError, match="sample k4: metadata is not a JSON object"):
        metadata({"__key__": "k4", "json": b"[1]"})
    assert metadata({"__key__": "k5"}) == {}
    assert is_failed_download({"__key__": "k", "json": b'{"status": "failed_to_download"}'})
    assert not is_failed_download({"__key__": "k", "json": b'{"status": "success"}'})
    assert not is_failed_download({"__key__": "k", "mp4": b"", "json": b'{"status": "failed"}'})
