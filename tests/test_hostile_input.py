"""Files users hand in, crafted to hurt (issue 29, "Readers of files users hand in"), and writes that
claim to be atomic: shard members over the size limit (a bzip2 bomb, a sparse tar) refused from the
tar header, bad metadata skipped and counted, paths that leave their folder refused by one rule,
model folders whose config asks for huge tensors, a cut-short metrics.jsonl, and folder swaps that
keep the old folder until the new one is in place."""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from mmvssl import fsio
from mmvssl.data.decode import DecodeError
from mmvssl.data.rawsample import REFUSED, metadata
from mmvssl.data.shardio import MemberLimits, tar_samples
from mmvssl.errors import ConfigError

# A 934-byte bzip2 tar: 000000.mp4 declares (and decompresses to) 1025 MiB of zeros, then 000000.json.
# Made once with bz2.BZ2Compressor over a tar header and the zeros (13 s); stored here so the test is fast.
BOMB = base64.b64decode(
    "QlpoOTFBWSZTWbecdLUFfjLbgNiAQAFlgAEAYAJeAAAIIAB1CSEJppkMQIqgbKAGnqTFqRQBVUTMAEBVUTXSInGbACASSSEMiuYp"
    "EhBitqK03bDTjLwdydj7u96qoFQBVUT8xQVkmU1kOCeLfAV+OQADAAAAIIAAwgE1GQqAlqQqAlzFBWSZTWQ4J4t8BX45AAMAAAAg"
    "gADCATUZCoCWpCoCXMUFZJlNZDgni3wFfjkAAwAAACCAAMIBNRkKgJakKgJcxQVkmU1kOCeLfAV+OQADAAAAIIAAwgE1GQqAlqQq"
    "AlzFBWSZTWQ4J4t8BX45AAMAAAAggADCATUZCoCWpCoCXMUFZJlNZDgni3wFfjkAAwAAACCAAMIBNRkKgJakKgJcxQVkmU1kOCeL"
    "fAV+OQADAAAAIIAAwgE1GQqAlqQqAlzFBWSZTWQ4J4t8BX45AAMAAAAggADCATUZCoCWpCoCXMUFZJlNZDgni3wFfjkAAwAAACCA"
    "AMIBNRkKgJakKgJcxQVkmU1kOCeLfAV+OQADAAAAIIAAwgE1GQqAlqQqAlzFBWSZTWQ4J4t8BX45AAMAAAAggADCATUZCoCWpCoC"
    "XMUFZJlNZDgni3wFfjkAAwAAACCAAMIBNRkKgJakKgJcxQVkmU1kOCeLfAV+OQADAAAAIIAAwgE1GQqAlqQqAlzFBWSZTWQ4J4t8"
    "BX45AAMAAAAggADCATUZCoCWpCoCXMUFZJlNZDgni3wFfjkAAwAAACCAAMIBNRkKgJakKgJcxQVkmU1kOCeLfAV+OQADAAAAIIAA"
    "wgE1GQqAlqQqAlzFBWSZTWQ4J4t8BX45AAMAAAAggADCATUZCoCWpCoCXMUFZJlNZDgni3wFfjkAAwAAACCAAMIBNRkKgJakKgJc"
    "xQVkmU1kOCeLfAV+OQADAAAAIIAAwgE1GQqAlqQqAlzFBWSZTWQ4J4t8BX45AAMAAAAggADCATUZCoCWpCoCXMUFZJlNZDgni3wF"
    "fjkAAwAAACCAAMIBNRkKgJakKgJcxQVkmU1kOCeLfAV+OQADAAAAIIAAwgE1GQqAlqQqAlzFBWSZTWZYuouYBCt/bgNqAUAF9kAI"
    "AZDGeCkQIIAByGVMgepo0NDTQZqBFRGjKNMQyBkw499IzghtAAUURAN7AABURAJY0L7pSgqqKIgEEppVldvO+2MxD1nRKvOV3G8Y"
    "IgSLBSDWYzFJ+qtVbVX57yCSQSCCAB+LuSKcKEgOw2nzAA=="
)


def sparse_member(name: str, real_size: int, data: bytes = b"x" * 512) -> bytes:
    """One GNU sparse tar member (old 'S' header): 512 stored bytes standing for `real_size` bytes."""
    h = bytearray(512)

    def put(offset: int, value: bytes) -> None:
        h[offset:offset + len(value)] = value
    put(0, name.encode()), put(100, b"0000644\0"), put(108, b"0000000\0"), put(116, b"0000000\0")
    put(124, b"%011o\0" % len(data)), put(136, b"%011o\0" % 0), put(156, b"S"), put(257, b"ustar  \0")
    put(386, b"%011o\0" % (real_size - len(data))), put(398, b"%011o\0" % len(data))  # one sparse block, at the end
    put(483, b"%011o\0" % real_size)
    put(148, b" " * 8), put(148, b"%06o\0 " % sum(h))
    return bytes(h) + data


def tar_bytes(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def read_all(path, limits=None) -> tuple[list[dict], float, int]:
    """Every sample of one shard through tar_samples; (samples, seconds, peak bytes Python allocated)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        samples = list(tar_samples([{"url": str(path)}], limits=limits))
        return samples, time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---- shard members over the size limit

def test_sparse_tar_member_of_2_gib_is_refused_unread_and_the_next_sample_read(tmp_path, capsys):
    shard = tmp_path / "sparse.tar"
    shard.write_bytes(sparse_member("000000.mp4", 2**31) + tar_bytes({"000001.json": b'{"duration": 2}'}))
    assert shard.stat().st_size < 16_000
    assert tarfile.open(shard).getmember("000000.mp4").size == 2**31  # what a plain read would allocate
    samples, seconds, peak = read_all(shard)
    assert [s["__key__"] for s in samples] == ["000000", "000001"]
    assert "mp4" not in samples[0] and samples[1]["json"] == b'{"duration": 2}'
    assert peak < 20 * 2**20  # the check: a read of the member would hold 2 GiB (no wall-clock bound: noisy)
    with pytest.raises(DecodeError, match=r"sample 000000: member 000000\.mp4 is 2048\.0 MiB, over "
                                          r"data\.max_member_mb=1024"):
        metadata(samples[0])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sparse.tar" in err[0] and "data.max_member_mb=1024" in err[0]


def test_bzip2_bomb_is_refused_from_its_header_without_decompressing_it(tmp_path, capsys):
    shard = tmp_path / "bomb.tar.bz2"
    shard.write_bytes(BOMB)
    assert len(BOMB) < 1000
    samples, seconds, peak = read_all(shard)
    assert len(samples) == 1 and REFUSED in samples[0] and "mp4" not in samples[0]
    # a compressed tar can only be passed by decompressing: the rest of that shard is skipped, said so
    assert b"1025.0 MiB, over data.max_member_mb=1024" in samples[0][REFUSED]
    assert b"rest of this compressed or streamed shard skipped" in samples[0][REFUSED]
    assert peak < 20 * 2**20  # reading the member would hold 1025 MiB
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_limits_are_options_per_member_kind(tmp_path):
    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_bytes({"a.mp4": b"v" * 3000, "a.json": b"{}", "b.mp4": b"v" * 10, "b.txt": b"t" * 3000}))
    samples, _, _ = read_all(shard, MemberLimits(max_member_mb=2000 / 2**20, max_text_member_mb=1000 / 2**20))
    assert samples[0]["json"] == b"{}" and b"a.mp4 is 0.0 MiB, over data.max_member_mb" in samples[0][REFUSED]
    assert samples[1]["mp4"] == b"v" * 10 and b"b.txt" in samples[1][REFUSED] and b"max_text_member_mb" in samples[1][REFUSED]
    samples, _, _ = read_all(shard)  # the defaults take all of it
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [["json", "mp4"], ["mp4", "txt"]]


# ---- bad metadata: one check, a DecodeError naming the key and the reason

@pytest.mark.parametrize("text, reason", [
    ('{"duration": 1e400}', "key 'duration' is Infinity, not a finite number >= 0"),
    ('{"duration": Infinity}', "key 'duration' is Infinity"),
    ('{"duration": NaN}', "key 'duration' is NaN"),
    ('{"duration": [1]}', r"key 'duration' is \[1\]"),
    ('{"duration": true}', "key 'duration' is true"),
    ('{"fps": -3}', "key 'fps' is -3"),
    ('{"narrations": 5}', "key 'narrations' is int, not a list"),
    ('{"narrations": [{"start": [0], "end": 1, "text": "a"}]}', r"narrations\[0\]\.start is \[0\]"),
    ('{"narrations": [{"start": 0, "end": 1e999, "text": "a"}]}', r"narrations\[0\]\.end is Infinity"),
    ('{"narrations": [{"start": 2, "end": 1, "text": "a"}]}', r"narrations\[0\] starts after it ends"),
    ('{"narrations": ["a"]}', r"narrations\[0\] is str"),
    ('{"pseudo_narrations": [{"start": 0, "end": 1, "text": 7}]}', r"pseudo_narrations\[0\]\.text is not a string"),
    ('{"caption": ["x"]}', "key 'caption' is not a string"),
])
def test_bad_metadata_is_a_decode_error_naming_key_and_reason(text, reason):
    with pytest.raises(DecodeError, match=r"sample k: bad metadata, " + reason):
        metadata({"__key__": "k", "json": text.encode()})


def test_good_metadata_passes_the_check_unchanged():
    meta = {"duration": 3, "fps": 2.5, "caption": "c", "narrations": [{"start": "1.5", "end": 2, "text": "a"}],
            "paraphrases": [], "label": ["any", "user", "value"], "width": None}
    assert metadata({"__key__": "k", "json": json.dumps(meta).encode()}) == meta


BAD_METADATA = ['{"duration": 1e400}', '{"duration": Infinity}', '{"duration": [1]}', '{"narrations": 5}',
                '{"duration": 3, "narrations": [{"start": [1], "end": 2, "text": "a"}]}']


@pytest.fixture(scope="module")
def hostile_shard(demo_shards, tmp_path_factory) -> tuple[Path, list[str]]:
    """One shard: a 2 GiB sparse video member, five samples with bad metadata (a good video each),
    then four good demo samples; returns (folder, good keys)."""
    from tests.conftest import raw_samples
    good = raw_samples(demo_shards["val"])[:4]
    members = {}
    for i, text in enumerate(BAD_METADATA):
        members.update({f"bad{i}.mp4": good[0]["mp4"], f"bad{i}.json": text.encode()})
    for s in good:
        members.update({f"{s['__key__']}.{k}": v for k, v in s.items() if not k.startswith("__")})
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "shard-000000.tar").write_bytes(sparse_member("big.mp4", 2**31) + tar_bytes(members))
    return folder, [s["__key__"] for s in good]


def test_the_loader_skips_and_counts_bad_samples_and_never_stops(hostile_shard):
    from mmvssl.data.loader import SampleSpec, build_loader
    folder, good = hostile_shard
    spec = SampleSpec(num_frames=2, fps=2.0, size=32, train=False)
    batches = list(build_loader(str(folder), spec, 2, mode="epoch"))
    assert sorted(k for b in batches for k in b["key"]) == sorted(good)
    assert sum(int(b["failed"]) for b in batches) == 1 + len(BAD_METADATA)  # the refused member and the bad metadata


def test_the_training_stream_takes_its_member_limit_from_the_data_section(hostile_shard):
    from omegaconf import OmegaConf

    from mmvssl.data.loader import SampleSpec, build_loader
    from mmvssl.data.options import DataConfig, loader_options
    from mmvssl.errors import MmvsslError
    folder, good = hostile_shard
    spec = SampleSpec(num_frames=2, fps=2.0, size=32, train=True)
    options = {**loader_options(OmegaConf.structured(DataConfig())), "num_workers": 0, "shuffle_buffer": 1}
    batch = next(iter(build_loader(str(folder), spec, 2, **options)))  # resampled: the bad samples skipped
    assert set(batch["key"]) <= set(good)
    options = {**loader_options(OmegaConf.structured(DataConfig(max_member_mb=0.001))), "num_workers": 0}
    with pytest.raises(MmvsslError, match=r"samples failed to decode .* over data\.max_member_mb=0\.001"):
        next(iter(build_loader(str(folder), spec, 2, **options)))  # every video refused: the error rate stops it


def test_shards_inspect_and_verify_count_bad_samples_with_key_and_reason(hostile_shard):
    from mmvssl.data.audit import inspect_shards, verify_shards
    folder, good = hostile_shard
    stats = inspect_shards(str(folder))
    assert (stats["samples"], stats["refused"], stats["bad_metadata"], stats["with_video"]) == (10, 1, 5, 4)
    reasons = {p["key"]: p["reason"] for p in stats["problems"]}
    assert set(reasons) == {"big", *(f"bad{i}" for i in range(5))}
    assert "over data.max_member_mb=1024" in reasons["big"] and "key 'narrations' is int" in reasons["bad3"]
    assert "narrations[0].start is [1]" in reasons["bad4"]
    result = verify_shards(str(folder))
    assert sorted(f["key"] for f in result["failed"]) == sorted(reasons) and result["checked"] == 10
    small = inspect_shards(str(folder), MemberLimits(max_member_mb=0.001))  # the option: every video refused,
    assert (small["samples"], small["refused"], small.get("with_video", 0)) == (10, 10, 0)  # each passed by a seek


def test_shards_commands_take_the_member_limit_as_a_flag(hostile_shard, capsys):
    from mmvssl.cli import main
    folder, _ = hostile_shard
    assert main(["shards", "inspect", str(folder), "--max-member-mb", "0.001"]) in (0, None)
    stats = json.loads(capsys.readouterr().out)
    assert stats["refused"] == 10 and "over data.max_member_mb=0.001 (refused unread)" in stats["problems"][1]["reason"]


# ---- paths that leave their folder: one rule (fsio.inside) for shards build, index build, datasets cut

def test_inside_is_the_one_containment_rule(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "out.mp4").write_bytes(b"x")
    os.symlink(tmp_path / "out.mp4", root / "link.mp4")
    os.symlink(root / "sub", root / "inner")
    assert fsio.inside(root, "sub/a.mp4") == (root / "sub" / "a.mp4").resolve()
    assert fsio.inside(root, "inner/a.mp4") == (root / "sub" / "a.mp4").resolve()  # a symlink that stays inside
    assert fsio.inside(root, str(root / "sub" / "a.mp4")) is not None  # absolute, but inside
    for escape in ("../out.mp4", "sub/../../out.mp4", str(tmp_path / "out.mp4"), "link.mp4", "/etc/passwd"):
        assert fsio.inside(root, escape) is None, escape


def test_shards_build_refuses_captions_pointing_outside_the_videos_folder(tmp_path):
    from mmvssl.data.shards import build_shards
    from tests.conftest import make_video
    videos = tmp_path / "videos"
    make_video(videos / "a.mp4", seconds=1.0)
    make_video(tmp_path / "secret" / "s.mp4", seconds=1.0)
    os.symlink(tmp_path / "secret" / "s.mp4", videos / "link.mp4")
    lines = [{"video": "a.mp4"}, {"video": str(tmp_path / "secret" / "s.mp4")}, {"video": "../secret/s.mp4"},
             {"video": "link.mp4"}, {"video": "b.mp4", "narrations": [{"start": [0], "end": 1, "text": "t"}]},
             {"video": "b.mp4", "duration": 1e400}]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = build_shards(videos, tmp_path / "shards", captions=tmp_path / "captions.jsonl")
    assert [a["source"] for a in report["accepted"]] == ["a.mp4"]
    reasons = {r.get("line"): r["reason"] for r in report["rejected"]}
    assert reasons[2].startswith("refused, absolute path") and reasons[3].startswith("refused, path '../secret/s.mp4' leaves")
    assert reasons[4].startswith("refused, path 'link.mp4' leads outside") and "(a symlink out)" in reasons[4]
    assert reasons[5] == "narrations[0].start is [0], not a finite number"
    assert reasons[6] == "key 'duration' is Infinity, not a finite number >= 0"
    scanned = build_shards(videos, tmp_path / "scanned")  # no captions: the folder's files, the link refused
    assert [a["source"] for a in scanned["accepted"]] == ["a.mp4"]
    assert [r["source"] for r in scanned["rejected"]] == ["link.mp4"]


def test_datasets_cut_never_writes_outside_out_nor_reads_outside_videos(tmp_path, capsys):
    from mmvssl.cli import main
    videos, out = tmp_path / "videos", tmp_path / "out"
    (videos / "P01").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.MP4").write_bytes(b"not read")
    entries = [
        {"id": "../../escape/pwned", "video": "clips/../../escape/pwned.mp4", "clip": [0, 1], "source_video": "P01/v.MP4"},
        {"id": "abs", "video": str(tmp_path / "abs.mp4"), "clip": [0, 1], "source_video": "P01/v.MP4"},
        {"id": "src", "video": "clips/src.mp4", "clip": [0, 1], "source_video": str(tmp_path / "elsewhere" / "x.MP4")},
        {"id": "up", "video": "clips/up.mp4", "clip": [0, 1], "source_video": "../elsewhere/x.MP4"},
        {"id": "inf", "video": "clips/inf.mp4", "clip": [0, 1e999], "source_video": "P01/v.MP4"},
    ]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries) + "{not json\n")
    assert main(["datasets", "cut", str(tmp_path / "captions.jsonl"), "--videos", str(videos), "--out", str(out)]) in (0, None)
    printed = capsys.readouterr().out
    assert "6 clips: 0 written, 0 already there, 6 failed" in printed and "line 6 (None): malformed JSON" in printed
    assert "line 1 (../../escape/pwned): refused, video: path 'clips/../../escape/pwned.mp4' leaves" in printed
    assert "line 2 (abs): refused, video: absolute path" in printed
    assert "line 3 (src): refused, source_video: absolute path" in printed
    assert "line 4 (up): refused, source_video: path '../elsewhere/x.MP4' leaves" in printed
    assert "line 5 (inf): source video not found" in printed  # inside both folders: tried, and missing
    assert not (tmp_path / "escape").exists() and not (tmp_path / "abs.mp4").exists() and not out.exists()


# ---- model folders whose config asks for more than their weights hold

def _edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_a_model_config_asking_for_huge_tensors_is_refused_before_any_memory(tmp_path):
    from mmvssl.models.presets import create_model, load_model
    create_model("vatt-tiny").save_pretrained(tmp_path / "m")
    assert load_model(tmp_path / "m").config["text"]["vocab_size"] == 49408
    _edit_config(tmp_path / "m", lambda c: c["text"].update(vocab_size=10**10))  # 5 TB of float32 embeddings
    with pytest.raises(ConfigError, match=r"model\.safetensors: tensor 'encoders\.text\.token_embed\.weight' is "
                                          r"\[49408, 128\], config\.json asks for \[10000000000, 128\]"):
        load_model(tmp_path / "m")  # the header is compared before anything is allocated
    _edit_config(tmp_path / "m", lambda c: c["text"].update(vocab_size=1e10))  # a float: not a model at all
    with pytest.raises(ConfigError, match=r"config\.json: does not describe a model \(TypeError"):
        load_model(tmp_path / "m")
    _edit_config(tmp_path / "m", lambda c: c["text"].update(vocab_size=49408, depth=3))  # one more block
    with pytest.raises(ConfigError, match=r"has no tensor 'encoders\.text\.transformer\.blocks\.2\..*' that config\.json asks for"):
        load_model(tmp_path / "m")


def test_a_narrator_config_asking_for_huge_tensors_is_refused_before_any_memory(tmp_path):
    from mmvssl.narrator.model import Narrator
    from tests.test_narrator import tiny_config
    Narrator(tiny_config()).save_pretrained(tmp_path / "n")
    assert Narrator.from_pretrained(tmp_path / "n").config["lm"]["vocab_size"] == 120
    _edit_config(tmp_path / "n", lambda c: c["lm"].update(vocab_size=10**10))
    with pytest.raises(ConfigError, match=r"tensor 'lm\.transformer\.wte\.weight' is \[120, 64\], config\.json asks "
                                          r"for \[10000000000, 64\]"):
        Narrator.from_pretrained(tmp_path / "n")


# ---- a metrics.jsonl cut short by a kill

def test_a_cut_short_last_metrics_line_is_dropped_with_a_note(tmp_path, capsys):
    from mmvssl.train.monitor import keep_metrics_until
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 5, "lo')  # killed mid-write
    keep_metrics_until(path, 3)
    assert path.read_text() == "\n".join(lines[:3]) + "\n"
    assert capsys.readouterr().err.strip() == (f"mmvssl: note: {path}: dropped 1 unreadable line(s) (5; a run killed "
                                               f"mid-write leaves its last line cut short)")
    keep_metrics_until(path, 3)  # a clean file: no note, nothing changed
    assert path.read_text() == "\n".join(lines[:3]) + "\n" and capsys.readouterr().err == ""


# ---- writes that claim to be atomic: fsync before the rename, the directory after it, old folders kept

def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b))[1])
    fsio.atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert events == [("fsync", False), ("replace", "r.json"), ("fsync", True)]
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1} and os.listdir(tmp_path) == ["r.json"]


def test_a_failed_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    (tmp_path / "r.json").write_text("old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        fsio.atomic_write_text(tmp_path / "r.json", "new")
    assert (tmp_path / "r.json").read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_folder_is_swapped_in_and_the_old_one_survives_a_failed_save(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fsio, "_exchange", lambda a, b: False)
    with fsio.atomic_folder(tmp_path / "m") as tmp:
        (tmp / "f").write_text("one")
    with pytest.raises(RuntimeError):
        with fsio.atomic_folder(tmp_path / "m") as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("killed mid-save")
    assert (tmp_path / "m" / "f").read_text() == "one"
    with fsio.atomic_folder(tmp_path / "m") as tmp:
        (tmp / "f").write_text("two")
    assert (tmp_path / "m" / "f").read_text() == "two" and os.listdir(tmp_path) == ["m"]  # no temp or old left


def test_the_narrator_and_model_saves_keep_the_old_folder_when_saving_fails(tmp_path, monkeypatch):
    import mmvssl.models.multimodal as multimodal
    import mmvssl.narrator.model as narrator_model
    from mmvssl.models.presets import create_model, load_model
    from mmvssl.narrator.model import Narrator
    from tests.test_narrator import tiny_config
    torch.manual_seed(0)
    narrator, model = Narrator(tiny_config()), create_model("vatt-tiny")
    narrator.save_pretrained(tmp_path / "n")
    model.save_pretrained(tmp_path / "m")

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")
    for module in (narrator_model, multimodal):
        monkeypatch.setattr(module, "save_file", failing)
    torch.manual_seed(1)
    with pytest.raises(OSError, match="No space left"):
        Narrator(tiny_config()).save_pretrained(tmp_path / "n")
    with pytest.raises(OSError, match="No space left"):
        create_model("vatt-tiny").save_pretrained(tmp_path / "m")
    for name, value in Narrator.from_pretrained(tmp_path / "n").state_dict().items():
        assert torch.equal(value, narrator.state_dict()[name]), name
    for name, value in load_model(tmp_path / "m").state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    assert sorted(os.listdir(tmp_path)) == ["m", "n"]


# ---- every other reader of shards goes through shardio: an oversized member refused from its header

BIG_LINE = "member big.mp4 is 2048.0 MiB, over data.max_member_mb=1024 (refused unread)"


def fresh_copy(hostile_shard, tmp_path) -> tuple[Path, Path, list[str]]:
    """(folder, shard, good keys): the hostile shard under a new path, so that its refusal is reported
    again (one line per shard and member in a process; other tests read the same shard)."""
    import shutil
    folder, good = hostile_shard
    shutil.copytree(folder, tmp_path / "shards")
    return tmp_path / "shards", tmp_path / "shards" / "shard-000000.tar", good


def refusals(err: str) -> list[str]:
    """The shard readers' refusal lines on stderr (a progress bar may share the line before one)."""
    marker = "mmvssl: warning: "
    return [line[line.index(marker):] for line in err.splitlines() if marker in line and "refused unread" in line]


def test_extract_refuses_the_oversized_member_with_one_line_and_embeds_the_rest(hostile_shard, tmp_path, capsys):
    from mmvssl.cli import main
    from mmvssl.evaluation.features import load_features
    from mmvssl.models.presets import create_model
    folder, shard, good = fresh_copy(hostile_shard, tmp_path)
    create_model("vatt-tiny").save_pretrained(tmp_path / "m")
    assert main(["extract", str(tmp_path / "m"), "--data", str(folder), "--out", str(tmp_path / "f.safetensors")]) in (0, None)
    out, err = capsys.readouterr()
    assert refusals(err) == [f"mmvssl: warning: {shard}: {BIG_LINE}"]
    assert "4 samples (6 failed to decode)" in out  # the refused video and the five bad metadata
    features = load_features(tmp_path / "f.safetensors")
    assert sorted(features["keys"]) == sorted(good) and features["failed"] == 6


def test_extract_and_eval_take_the_member_limit_as_an_option(hostile_shard, tmp_path, capsys):
    """--max-member-mb reaches the reader: the refusal names the limit given (the demo's good videos
    are far below 0.5 MiB, the sparse member far above)."""
    from mmvssl.cli import main
    from mmvssl.models.presets import create_model
    folder, shard, good = fresh_copy(hostile_shard, tmp_path)
    create_model("vatt-tiny").save_pretrained(tmp_path / "m")
    assert main(["extract", str(tmp_path / "m"), "--data", str(folder), "--out", str(tmp_path / "f.safetensors"),
                 "--max-member-mb", "0.5"]) in (0, None)
    out, err = capsys.readouterr()
    assert refusals(err) == [f"mmvssl: warning: {shard}: {BIG_LINE.replace('=1024', '=0.5')}"]
    assert "4 samples (6 failed to decode)" in out


def test_eval_refuses_the_oversized_member_with_one_line_and_scores_the_rest(hostile_shard, tmp_path, capsys):
    from mmvssl.cli import main
    from mmvssl.evaluation.classifier import classify_shards
    from mmvssl.models.classifier import VideoClassifier
    from mmvssl.models.presets import create_model
    folder, shard, good = fresh_copy(hostile_shard, tmp_path)
    torch.manual_seed(0)
    model = create_model("vatt-tiny")
    model.save_pretrained(tmp_path / "m")
    assert main(["eval", "retrieval", str(tmp_path / "m"), "--data", str(folder), "--out", str(tmp_path / "r")]) in (0, None)
    assert refusals(capsys.readouterr().err) == [f"mmvssl: warning: {shard}: {BIG_LINE}"]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["num_samples"] == 4 and report["failed_samples"] == 6
    # a fine-tuned classifier's evaluation reads shards the same way (the refusal was said once above)
    labels = sorted({json.loads(s["json"])["label"] for s in tar_samples([{"url": str(shard)}])
                     if s["__key__"] in good})
    scored = classify_shards(VideoClassifier(model, labels), str(folder))
    assert sorted(scored["keys"]) == sorted(good) and scored["failed"] == 6
    assert refusals(capsys.readouterr().err) == []


def test_narrate_refuses_the_oversized_member_with_one_line_and_narrates_the_rest(hostile_shard, tmp_path, capsys):
    from mmvssl.cli import main
    from tests.conftest import raw_samples
    from tests.test_narrator import save_untrained_narrator
    folder, shard, good = fresh_copy(hostile_shard, tmp_path)
    narrator = save_untrained_narrator(tmp_path, sampling={"num_frames": 4, "fps": 2.0, "size": 32}, image_size=32)
    assert main(["narrate", narrator, "--input", str(folder), "--out", str(tmp_path / "n.jsonl"),
                 "--shards-out", str(tmp_path / "pseudo"), "--num-candidates", "1", "--max-length", "4",
                 "--max-member-mb", "0.5"]) in (0, None)  # the limit given reaches the reader
    out, err = capsys.readouterr()
    big_line = BIG_LINE.replace("=1024", "=0.5")
    assert refusals(err) == [f"mmvssl: warning: {shard}: {big_line}"]  # the shard reader's line
    assert "narrate: skipped big: sample big: " + big_line in err  # and narrate's own line for the sample it skips
    assert "narrated" in out and "of 4 videos" in out and "6 videos skipped" in out
    assert sorted({json.loads(line)["key"] for line in (tmp_path / "n.jsonl").read_text().splitlines()}) == sorted(good)
    assert sorted(s["__key__"] for s in raw_samples(tmp_path / "pseudo")) == sorted(good)
    report = json.loads((tmp_path / "pseudo" / "narrate_report.json").read_text())
    skipped = {item["key"]: item["reason"] for r in report["shards"].values() for item in r["skipped"]}
    assert big_line in skipped["big"] and len(skipped) == 6


def plain_member(name: str, data: bytes) -> bytes:
    """One regular tar member (header and padded data), no end-of-archive blocks: to sit between sparse ones."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % 512)


def labelled_shard(path: Path) -> Path:
    """a: its .json over the text limit; b: labelled; c: its video over the limit; d: labelled, no video."""
    video = b"v" * 100
    path.write_bytes(sparse_member("a.json", 32 * 2**20) + plain_member("a.mp4", video) + plain_member("b.mp4", video)
                     + plain_member("b.json", b'{"label": "x"}') + sparse_member("c.mp4", 2**31)
                     + tar_bytes({"c.json": b'{"label": "y"}', "d.json": b'{"label": "z"}'}))
    return path


def test_labels_leave_out_samples_with_an_oversized_member_as_the_loader_does(tmp_path, capsys):
    from mmvssl.data.labels import check_labels, shard_labels
    shard = labelled_shard(tmp_path / "s.tar")
    assert shard_labels(str(shard)) == {"b": "x", "d": "z"}
    assert refusals(capsys.readouterr().err) == [
        f"mmvssl: warning: {shard}: member a.json is 32.0 MiB, over data.max_text_member_mb=16 (refused unread)",
        f"mmvssl: warning: {shard}: member c.mp4 is 2048.0 MiB, over data.max_member_mb=1024 (refused unread)"]
    # exactly the samples the shared reader does not refuse
    assert {s["__key__"] for s in tar_samples([{"url": str(shard)}]) if REFUSED not in s} == {"b", "d"}
    # the limit is an option: below 100 bytes every video is refused, and its sample with it
    assert shard_labels(str(shard), limits=MemberLimits(max_member_mb=50 / 2**20)) == {"d": "z"}
    assert check_labels(str(shard), ["x", "z"], "classes.txt", fraction=1.0) == frozenset({"b", "d"})


def test_tokenizer_texts_leave_out_samples_with_an_oversized_member(tmp_path, capsys):
    from mmvssl.narrator.tokenizer import texts_from_shards
    shard = tmp_path / "s.tar"
    shard.write_bytes(sparse_member("big.mp4", 2**31) + plain_member("big.json", b'{"caption": "never read"}')
                      + sparse_member("huge.txt", 2**25)
                      + tar_bytes({"huge.mp4": b"v", "ok.mp4": b"v", "ok.txt": b"a",
                                   "ok.json": b'{"narrations": [{"start": 0, "end": 1, "text": "b"}]}'}))
    assert texts_from_shards(str(shard)) == ["a", "b"]  # the .txt fills the missing caption
    assert [line.split(": member ")[1].split(" is ")[0] for line in refusals(capsys.readouterr().err)] == [
        "big.mp4", "huge.txt"]


def test_report_thumbnails_refuse_the_oversized_member_with_one_line(hostile_shard, tmp_path, capsys):
    from mmvssl.evaluation.thumbnails import read_videos
    folder, shard, good = fresh_copy(hostile_shard, tmp_path)
    videos = read_videos({"big": str(shard), good[0]: str(shard), good[-1]: str(shard)})
    stored = {s["__key__"]: s["mp4"] for s in tar_samples([{"url": str(shard)}]) if s["__key__"] in good}
    assert videos == {good[0]: stored[good[0]], good[-1]: stored[good[-1]]}
    assert refusals(capsys.readouterr().err) == [f"mmvssl: warning: {shard}: {BIG_LINE}"]


def test_the_server_never_serves_an_oversized_member(tmp_path, capsys):
    """A shard whose video member grew past the limit after it was indexed (the index scan refuses it
    too): a 403 naming the member and the limit, never the shard's path; its neighbour still served."""
    from mmvssl.data.shards import build_shards
    from mmvssl.models.presets import create_model
    from mmvssl.search.index import build_index
    from tests.conftest import make_video
    from tests.test_search_security import one_line_error, request, start, stop
    for i in range(2):
        make_video(tmp_path / "clips" / f"clip{i}.mp4", seconds=1.0, fps=5, size=(32, 32), audio_rate=None)
    build_shards(tmp_path / "clips", tmp_path / "shards", samples_per_shard=2)
    create_model("vatt-tiny").save_pretrained(tmp_path / "m")
    build_index(str(tmp_path / "m"), str(tmp_path / "shards"), str(tmp_path / "idx"), window=1.0)
    shard = next((tmp_path / "shards").glob("*.tar"))
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    second = members["000000001.mp4"]
    shard.write_bytes(sparse_member("000000000.mp4", 2**31)
                      + tar_bytes({k: v for k, v in members.items() if k != "000000000.mp4"}))
    server = start(tmp_path / "idx")
    port = server.server_address[1]
    try:
        for headers in ({"Range": "bytes=0-1"}, {}):
            status, data, _ = request(port, "GET", "/media/1/000000000", headers=headers)
            assert status == 403
            assert one_line_error(data) == "member 000000000.mp4 is 2048.0 MiB, over data.max_member_mb=1024 (refused unread)"
        status, data, _ = request(port, "GET", "/media/1/000000001")
        assert status == 200 and data == second
    finally:
        stop(server)
    server = start(tmp_path / "idx", max_member_mb=4096)  # serve --max-member-mb: a user's own large videos
    try:  # streamed from the member's offset: two bytes of the 2 GiB member, nothing more read
        status, data, response = request(server.server_address[1], "GET", "/media/1/000000000",
                                         headers={"Range": "bytes=0-1"})
        assert status == 206 and data == b"\0\0" and response.getheader("Content-Range") == f"bytes 0-1/{2**31}"
    finally:
        stop(server)
    assert refusals(capsys.readouterr().err) == [
        f"mmvssl: warning: {shard}: member 000000000.mp4 is 2048.0 MiB, over data.max_member_mb=1024 (refused unread)"]


# ---- frames too large for memory, refused by every decoder from the stream header

# A 12000x12000 H.264 mp4 of two grey frames: 423,744 bytes, 973 as bzip2 (made once with PyAV and
# libx264, ultrafast, crf 51). Decoding it took +619 MB (check_video_stream, the issue's +624 MB upload).
BIG_H264 = (
    "QlpoOTFBWSZTWYaLoUUAADH////flHd+n/9zetdjFr/v//BEQEGY8CgAk0QBEPZhbYAYwAMLjMWwBYNETSnpHpAaNAaDINAGhiaA"
    "AAyGmRkDRoAA0A0Bp6gamQTJkE01TzSNINpoIbUGmg00Bo00BoA00BoAMTTRoGgAgwAEwABMEwAAAAAEwCYCGAACMAAAGKSaQ9ID"
    "QNDQ0DTRoBoAAAAAAAAA0BoAABuT+JsyQup7C0ZAhx4baXDkillNxsxWyQZlTUmQlE+pIqKhQDJqBLJCAKSA8JIUXviB1yKlYTT8"
    "MqWxPF/jtOZo5fjbUwGQKQOypuRZFbYCK9MnWEku0Z7GuGqRAgO1ARIiogDiCDSDjjjQJHsiAPRAOKbRdqYQj1DQrBV10kA6QQQR"
    "UswdaOavFC3TiJIkojA8RlYmo0DaIE2MNgFHt4qUGZgkm77EdsCJENewtXStMIAi60GuWUZJM26UJnjD5+ukkroXMophYJfJQfs4"
    "YKbY21kt/Cl1SAU6NmZXkI+4q0XpCrjKNNXs1awxi59DND1r7wWs0AXUm8tErhAKJM5TGxazLEcYYQDHGG6JHZg6NQDoMuKWWcHZ"
    "qqmxRGGaZzBT14ikJU+GEG52s+UDVVjdLHF7ndNLqF4OpaY+JnRNqdZZwvzSHkbZhinoFaoxSdRqpLywY6FTOj45qAKcP4MZV0t0"
    "8cslRn6BO+SAIgSSACAKKigwICZQNNtukGxGSg04T+NhPCITYhJ1PXDQPFknKC9jIyPctdeOvOewzz2t4zxB0ZuTUwkhl2Cd/sGj"
    "hlTE7gAHISIT5+rNGJiMLENQ8CA0nosSHP90zk6tSeTAxCJDgFXC4hzLCMHNOstogwnqZInCGzPKGW0g7NWHuV4ZLZputyvomm1c"
    "y3SikZluf2vFQkyyphHMJCbeD7pTCsa5IsfFON9toj2nGdgX8ZNnlaJaJnSMCrSp48YgqVv+LlZ7rChH8rTl1Qis62+UKXzggmhK"
    "EtUEoF8dhLIlwYplQJY02nI6+foL3EFxAmwtGm3SoVqxyCMKOCzRKH3JALrJSvNN+OhkW2WwkqgImvcO0NKoIcSKjE0zZgRKmKmZ"
    "dKxEhlAr6+TFC9sqPXewR+QUUCE5VWaJgw10pBkq1ISpPpa2ZzaHcfEeTILAiKcl1dx7+exAJBJIAIAgPQKOHSz9q9WNIfzLxyle"
    "sU+H76YdPrDB1njb6+4GixKmzsnAiL2rlo534G/XcOb0ECIEREACAHA7anfug9ISWuMDehdTX9RpCwYDLxn/F3JFOFCQhouhRQ=="
)


def test_a_12000x12000_h264_is_refused_from_its_header_by_every_decoder_with_bounded_memory(tmp_path):
    import bz2
    import subprocess
    import sys
    video = tmp_path / "big.mp4"
    video.write_bytes(bz2.decompress(base64.b64decode(BIG_H264)))
    # in a fresh process, so the peak resident memory (FFmpeg's allocations too) is this check's alone
    script = (
        "import resource, sys\n"
        "from mmvssl.data.decode import DecodeError, check_video_stream, decode_all, decode_window, probe\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "info = probe(data, max_pixels=12000 * 12000, check_decode=False)  # the header only: no frame\n"
        "print(info.width, info.height, info.video_codec)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for decode in (lambda: decode_all(data), lambda: check_video_stream(data, info.duration),\n"
        "               lambda: decode_window(data, 0.0, 2, 2.0), lambda: probe(data)):\n"
        "    try:\n"
        "        decode()\n"
        "        print('decoded')\n"
        "    except DecodeError as e:\n"
        "        print(e)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n")
    result = subprocess.run([sys.executable, "-c", script, str(video)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "12000 12000 h264"
    assert lines[1:5] == ["frame size 12000x12000 exceeds the limit of 16777216 pixels"] * 4
    assert int(lines[5]) < 64 * 2**20  # one decoded 12000x12000 frame alone is 216 MB of YUV


def test_decode_all_and_check_video_stream_refuse_a_frame_over_the_limit_before_decoding(tmp_path):
    from mmvssl.data.decode import check_video_stream, decode_all, probe
    from tests.conftest import make_video
    video = make_video(tmp_path / "v.mp4", seconds=1.0, fps=5, size=(128, 96), audio_rate=None).read_bytes()
    message = "frame size 128x96 exceeds the limit of 10000 pixels"
    for decode in (lambda: decode_all(video, max_pixels=10_000), lambda: check_video_stream(video, 1.0, max_pixels=10_000),
                   lambda: probe(video, max_pixels=10_000)):
        with pytest.raises(DecodeError) as refused:
            decode()
        assert str(refused.value) == message
    frames, times, _ = decode_all(video, max_pixels=128 * 96)  # at the limit: decoded
    assert frames.shape == (5, 96, 128, 3) and len(times) == 5
    check_video_stream(video, 1.0, max_pixels=128 * 96)


def _raw_h264(width: int, height: int, frames: int = 3) -> bytes:
    import av
    import numpy as np
    out = io.BytesIO()
    with av.open(out, mode="w", format="h264") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 40 * i, np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return out.getvalue()


def test_a_stream_that_grows_its_frames_after_the_header_is_refused_at_the_first_large_frame():
    """H.264 may start a new sequence of another size mid-stream: the header says 32x32, the second
    sequence is 128x96. Each decoded frame is checked, so at most one frame over the limit is held."""
    import av
    from mmvssl.data.decode import check_video_stream, decode_all
    small = _raw_h264(32, 32)
    grown = small + _raw_h264(128, 96)
    with av.open(io.BytesIO(grown)) as container:
        context = container.streams.video[0].codec_context
        assert (context.width, context.height) == (32, 32)  # what the header check sees
    check_video_stream(small, 0.0, max_pixels=10_000)  # the first sequence alone passes
    for decode in (lambda: decode_all(grown, max_pixels=10_000), lambda: check_video_stream(grown, 0.0, max_pixels=10_000)):
        with pytest.raises(DecodeError, match=r"^frame size 128x96 exceeds the limit of 10000 pixels$"):
            decode()
    # decode_window seeks to its window, which a raw stream cannot: one line saying so (it was an
    # "Operation not permitted" OSError); in a container it checks every decoded frame as these do
    from mmvssl.data.decode import decode_window
    with pytest.raises(DecodeError, match=r"^video stream cannot seek .*: not a seekable container"):
        decode_window(grown, 0.0, 4, 4.0, None, None, max_pixels=10_000)
