"""`mmvssl index` / `search` / `serve`: building, resuming and updating an index, queries, a model
mismatch, corrupt files, and the server's refusal of every crafted media path."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mmvssl.cli import main
from mmvssl.errors import MmvsslError
from mmvssl.search import store
from mmvssl.search.index import add_to_index, build_index
from mmvssl.search.query import Searcher
from tests.conftest import make_video

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Two untrained vatt-tiny models with different weights (a and b)."""
    from mmvssl.models.presets import create_model
    root = tmp_path_factory.mktemp("search-models")
    out = {}
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        create_model("vatt-tiny").save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Four clips of 2, 3, 4 and 5 s (their red ramps differ), each with its own tone; a folder beside
    them holds files the server must never read."""
    root = tmp_path_factory.mktemp("search-videos")
    for i, hz in enumerate((300, 500, 800, 1300)):
        make_video(root / "clips" / f"clip{i}.mp4", seconds=2.0 + i, fps=10, tone_hz=hz)
    (root / "outside").mkdir()
    make_video(root / "outside" / "secret.mp4", seconds=1.0, fps=10)
    (root / "outside" / "secret.txt").write_text("not for the web")
    return root


@pytest.fixture(scope="module")
def index(models, videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("search-index") / "idx"
    build_index(models["a"], str(videos / "clips"), str(out), window=1.0, batch_size=4)
    return out


def dump(index_dir: Path) -> dict:
    """Every window of an index by (source, start, end): its narration and vectors per space."""
    db = sqlite3.connect(index_dir / store.DB_NAME)
    rows = {}
    for wid, src, start, end, narration in db.execute(
            'SELECT w.id, v.source, w.start, w."end", w.narration FROM windows w JOIN videos v ON v.id = w.video_id'):
        key = (src, start, end)
        assert key not in rows, f"window {key} stored twice"
        vecs = {space: np.frombuffer(vec, dtype=np.float32)
                for space, vec in db.execute("SELECT space, vec FROM vectors WHERE window_id = ?", (wid,))}
        rows[key] = (narration, vecs)
    faiss_counts = {s: e["count"] for s, e in store.get_info(db, "faiss", {}).items()}
    db.close()
    return {"windows": rows, "faiss": faiss_counts}


def tie_set(results: list[dict]) -> list[dict]:
    """The results tied with the first: their scores (rounded to 4 places in the output) within
    two rounding steps plus the tie tolerance of the best."""
    from mmvssl.evaluation.metrics import TIE_TOLERANCE
    return [r for r in results if r["score"] >= results[0]["score"] - 1e-4 - TIE_TOLERANCE]


def assert_same_index(a: dict, b: dict) -> None:
    assert a["windows"].keys() == b["windows"].keys()
    assert a["faiss"] == b["faiss"]
    for key, (narration, vecs) in a["windows"].items():
        assert narration == b["windows"][key][0]
        assert vecs.keys() == b["windows"][key][1].keys()
        for space, v in vecs.items():
            np.testing.assert_allclose(v, b["windows"][key][1][space], atol=1e-5)


def test_build_cuts_windows_and_queries_find_their_own_clip(index, videos, capsys):
    d = dump(index)
    assert len(d["windows"]) == 2 + 3 + 4 + 5  # 1 s windows
    assert set(d["faiss"]) == {"video_va", "video_vat", "audio_va", "audio_vat"}
    assert all(n == 14 for n in d["faiss"].values())
    report = json.loads((index / "build_report.json").read_text())
    assert report["num_accepted"] == 4 and report["num_rejected"] == 0
    searcher = Searcher(str(index))
    clip = (videos / "clips" / "clip2.mp4").read_bytes()
    # the query window [1, 2) of clip2 is an indexed window: its own embedding comes back (score 1),
    # at the top or tied with it (an untrained model may see other windows as nearly the same)
    seen = searcher.query(video=clip, start=1.0, end=2.0, k=3)
    assert any(r["score"] > 0.9999 for r in tie_set(seen) if (r["video"], r["start"], r["end"]) == ("clip2.mp4", 1.0, 2.0))
    # by sound, clip2's windows (the same steady tone) come first, in some order among themselves;
    # other tones rank below
    heard = searcher.query(audio=clip, start=1.0, end=2.0, k=5)
    assert [r["video"] for r in heard[:4]] == ["clip2.mp4"] * 4 and heard[4]["video"] != "clip2.mp4"
    assert next(r for r in heard if r["start"] == 1.0)["score"] > 0.9999
    assert main(["search", str(index), "a red circle", "-k", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 5 and results == sorted(results, key=lambda r: -r["score"])
    assert {"video", "start", "end", "score", "narration"} <= set(results[0])
    assert main(["search", str(index), "a red circle", "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["video", "start", "end", "score", "narration"] and len(table) == 3


def test_image_query_and_bad_queries(index, tmp_path, capsys):
    from PIL import Image
    Image.fromarray(np.full((40, 50, 3), 200, dtype=np.uint8)).save(tmp_path / "still.png")
    assert main(["search", str(index), "--image", str(tmp_path / "still.png"), "-k", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    (tmp_path / "not-media.mp4").write_text("#!/bin/sh\necho hi\n")
    assert main(["search", str(index), "--video", str(tmp_path / "not-media.mp4")]) == 2
    assert "query video: not a readable media file" in capsys.readouterr().err
    assert main(["search", str(index), "text", "--audio", str(tmp_path / "still.png")]) == 2
    assert "exactly one query" in capsys.readouterr().err


def test_killed_build_resumes_to_the_same_index(models, videos, index, tmp_path):
    out = tmp_path / "killed"
    code = (  # SIGKILL while the second batch's rows are inserted but not committed
        "import os, signal\n"
        "import mmvssl.search.index as I\n"
        "calls, store_batch = [0], I.store_batch\n"
        "def killing(*a, **k):\n"
        "    store_batch(*a, **k)\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "I.store_batch = killing\n"
        f"I.build_index({models['a']!r}, {str(videos / 'clips')!r}, {str(out)!r}, window=1.0, batch_size=2)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    db = sqlite3.connect(out / store.DB_NAME)
    assert db.execute("SELECT COUNT(*) FROM videos").fetchone()[0] == 1  # the first batch only
    assert store.get_info(db, "state") == "building"
    db.close()
    with pytest.raises(MmvsslError, match="not complete"):
        Searcher(str(out))
    counts = build_index(models["a"], str(videos / "clips"), str(out), window=1.0, batch_size=2)
    assert (counts["kept"], counts["embedded_videos"]) == (1, 3)
    assert_same_index(dump(out), dump(index))
    again = build_index(models["a"], str(videos / "clips"), str(out), window=1.0)
    assert (again["kept"], again["embedded_videos"], again["windows"]) == (4, 0, 14)


def test_add_changed_vanished_and_rejected_videos(models, videos, tmp_path):
    clips = tmp_path / "clips"
    shutil.copytree(videos / "clips", clips)
    (clips / "broken.mp4").write_bytes(b"\x00" * 100)
    os.symlink(videos / "outside" / "secret.mp4", clips / "escape.mp4")
    out = tmp_path / "idx"
    build_index(models["a"], str(clips), str(out), window=1.0)
    report = json.loads((out / "build_report.json").read_text())
    reasons = {r["source"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"broken.mp4", "escape.mp4"} and report["num_accepted"] == 4
    assert reasons["escape.mp4"] == "symlink out of the collection"
    assert reasons["broken.mp4"].startswith("not a readable media file")
    more = tmp_path / "more"
    make_video(more / "new.mp4", seconds=2.0, fps=10, tone_hz=2000)
    counts = add_to_index(str(out), str(more))
    assert (counts["embedded_videos"], counts["videos"], counts["windows"]) == (1, 5, 16)
    before = dump(out)["windows"][("clip1.mp4", 0.0, 1.0)][1]["video_va"]
    make_video(clips / "clip1.mp4", seconds=2.0, fps=10, size=(64, 64), tone_hz=3000)  # changed content
    (clips / "clip3.mp4").unlink()                                                      # vanished
    (clips / "broken.mp4").unlink()
    counts = build_index(models["a"], str(clips), str(out), window=1.0)
    assert (counts["embedded_videos"], counts["dropped"], counts["kept"]) == (1, 1, 2)
    d = dump(out)["windows"]
    assert not any(src == "clip3.mp4" for src, _, _ in d)
    assert sorted(k for k in d if k[0] == "clip1.mp4") == [("clip1.mp4", 0.0, 1.0), ("clip1.mp4", 1.0, 2.0)]
    assert not np.allclose(d[("clip1.mp4", 0.0, 1.0)][1]["video_va"], before)
    assert ("new.mp4", 0.0, 1.0) in d  # the other root is untouched
    with pytest.raises(MmvsslError, match="other settings: window 1.0"):
        build_index(models["a"], str(clips), str(out), window=2.0)


def test_query_with_another_model_names_both(models, videos, index, capsys):
    with pytest.raises(MmvsslError) as e:
        Searcher(str(index), model_dir=models["b"])
    message = str(e.value)
    assert models["a"] in message and models["b"] in message and message.count("fingerprint") == 2
    assert main(["search", str(index), "a circle", "--model", models["b"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmvssl: error: search index") and len(err.strip().splitlines()) == 1
    with pytest.raises(MmvsslError, match="was built with model"):
        build_index(models["b"], str(videos / "clips"), str(index))


def test_corrupt_index_files_are_detected(index, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(index, bad)
    data = bytearray((bad / "video_vat.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte among the vectors: faiss would read it silently
    (bad / "video_vat.faiss").write_bytes(bytes(data))
    with pytest.raises(MmvsslError, match=r"video_vat\.faiss is corrupt"):
        Searcher(str(bad))
    (bad / "video_vat.faiss").write_bytes(b"garbage")
    assert main(["search", str(bad), "a circle"]) == 2
    assert "video_vat.faiss is corrupt" in capsys.readouterr().err
    (bad / "video_vat.faiss").unlink()
    with pytest.raises(MmvsslError, match="missing from the search index"):
        Searcher(str(bad))
    (bad / store.DB_NAME).write_bytes(b"this is not sqlite" * 100)
    assert main(["search", str(bad), "a circle"]) == 2
    assert "not a readable search index database" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nowhere"), "a circle"]) == 2
    assert "not a search index" in capsys.readouterr().err


# ---- the server

@pytest.fixture(scope="module")
def served(index, videos, tmp_path_factory):
    """The index served on an ephemeral loopback port, uploads limited to 0.5 MiB."""
    from mmvssl.search.server import make_server
    server = make_server(str(index), port=0, max_upload_mb=0.5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    conn.putrequest(method, path, skip_accept_encoding=True)  # the path goes out exactly as written
    # X-Mmvssl: the header a page of another site cannot send without asking (docs/search.md, Security)
    for k, v in {"X-Mmvssl": "1", **(headers or {}),
                 **({"Content-Length": str(len(body))} if body is not None else {})}.items():
        conn.putheader(k, v)
    conn.endheaders()
    if body is not None:
        conn.send(body)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data, response


class OpenAudit:
    """Records files opened (and processes started) while active: an audit hook cannot be removed,
    so it stays installed and only records between start() and stop()."""
    events: list | None = None

    @classmethod
    def install(cls):
        if not getattr(cls, "_installed", False):
            def hook(event, args):
                if cls.events is not None and (event == "open" or event.startswith(("subprocess", "os.exec",
                                                                                    "os.system", "os.posix_spawn"))):
                    cls.events.append((event, args))
            sys.addaudithook(hook)
            cls._installed = True


def test_media_paths_outside_the_collection_get_404_and_nothing_outside_is_read(served, index, videos):
    clips, outside = videos / "clips", videos / "outside"
    good = (clips / "clip1.mp4").read_bytes()
    status, data, _ = request(served, "GET", "/media/1/clip1.mp4")
    assert status == 200 and data == good
    status, data, response = request(served, "GET", "/media/1/clip1.mp4", headers={"Range": "bytes=10-29"})
    assert status == 206 and data == good[10:30] and response.getheader("Content-Range") == f"bytes 10-29/{len(good)}"
    secret_abs = str(outside / "secret.txt")
    crafted = [
        "/media/1/../outside/secret.txt", "/media/1/../../outside/secret.txt", "/media/../../outside/secret.txt",
        "/media/1/%2e%2e/outside/secret.txt", "/media/1/%2E%2E%2Foutside%2Fsecret.txt",
        "/media/1/..%2foutside%2fsecret.txt", "/media/1/%252e%252e%252foutside%252fsecret.txt",
        "/media/1/..%5coutside%5csecret.txt", "/media/1/%c0%ae%c0%ae/outside/secret.txt",
        "/media/1/" + secret_abs, "/media/1/" + secret_abs.replace("/", "%2f"), "/media/1//" + secret_abs,
        "/media/" + secret_abs, "/media/%2f" + secret_abs.lstrip("/"), "/media/1/clip1.mp4%00.txt",
        "/media/1/clip1.mp4/../../outside/secret.txt", "/media/2/clip1.mp4", "/media/x/clip1.mp4",
        "/../outside/secret.txt", "/app.js/../../outside/secret.txt", "/thumb/../outside/secret.txt",
        "/static/index.html", "/index.html",
    ]
    OpenAudit.install()
    OpenAudit.events = []
    try:
        for path in crafted:
            status, data, _ = request(served, "GET", path)
            assert status == 404, path
            assert b"not for the web" not in data
        # a listed video swapped for a symlink that leads out of the collection
        (clips / "clip0.mp4").rename(clips / "clip0.keep")
        os.symlink(outside / "secret.mp4", clips / "clip0.mp4")
        try:
            status, data, _ = request(served, "GET", "/media/1/clip0.mp4")
        finally:
            (clips / "clip0.mp4").unlink()
            (clips / "clip0.keep").rename(clips / "clip0.mp4")
        assert status == 404
        opened = [str(args[0]) for event, args in OpenAudit.events if event == "open"]
    finally:
        OpenAudit.events = None
    assert not [p for p in opened if str(outside) in p], opened


def test_uploads_are_limited_held_in_memory_and_never_run(served, videos):
    OpenAudit.install()
    OpenAudit.events = []
    try:
        status, data, _ = request(served, "POST", "/api/search?kind=video", body=b"\x00" * (600 * 1024))
        assert status == 413 and b"exceeds the limit" in data
        status, data, _ = request(served, "POST", "/api/search?kind=video", headers={"Content-Length": str(10**10)})
        assert status == 413  # answered from the header alone, nothing read
        status, data, _ = request(served, "POST", "/api/search?kind=video", body=b"#!/bin/sh\ntouch /tmp/pwned\n")
        assert status == 400 and b"not a readable media file" in data
        clip = (videos / "clips" / "clip3.mp4").read_bytes()
        status, data, _ = request(served, "POST", "/api/search?kind=audio&start=2&end=3&k=5", body=clip)
        assert status == 200
        # the clips are steady tones: every window of clip3 ties with the query window by sound, so
        # the query defines the video and that the window holding [2, 3) is in the top tie set,
        # not which member of the tie comes first (that depends on float bits: docs/search.md)
        results = json.loads(data)["results"]
        assert results[0]["video"] == "clip3.mp4"
        assert ("clip3.mp4", 2.0) in {(r["video"], r["start"]) for r in tie_set(results)}
        events = list(OpenAudit.events)
    finally:
        OpenAudit.events = None
    writes = [args for event, args in events if event == "open" and isinstance(args[1], str) and set(args[1]) & set("wax+")]
    assert not writes and not [e for e, _ in events if e != "open"], events
    status, data, _ = request(served, "GET", "/api/search?q=a+circle&k=3")
    results = json.loads(data)["results"]
    assert status == 200 and len(results) == 3
    status, data, response = request(served, "GET", results[0]["thumb"])
    assert status == 200 and response.getheader("Content-Type") == "image/jpeg" and data[:2] == b"\xff\xd8"


def test_narrations_are_stored_and_mixed_into_text_scores_as_documented(models, videos, tmp_path, monkeypatch):
    import mmvssl.search.index as index_module
    from tests.test_narrator import save_untrained_narrator
    monkeypatch.setattr(index_module, "NARRATION_MAX_TOKENS", 8)  # an untrained narrator rambles to the limit
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("clip0.mp4", "clip1.mp4"):
        shutil.copy(videos / "clips" / name, clips / name)
    out = tmp_path / "idx"
    build_index(models["a"], str(clips), str(out), window=1.0, narrator=save_untrained_narrator(tmp_path))
    windows = dump(out)["windows"]
    assert len(windows) == 5 and all(n for n, _ in windows.values())  # a narration per window
    assert all("narration_vat" in vecs for _, vecs in windows.values())
    searcher = Searcher(str(out), narration_weight=0.3)
    q = searcher.text_terms("a red circle")[0].vector
    for r in searcher.query(text="a red circle", k=5):
        narration, vecs = windows[(r["video"], r["start"], r["end"])]
        assert r["narration"] == narration
        assert r["score"] == pytest.approx(0.7 * vecs["video_vat"] @ q + 0.3 * vecs["narration_vat"] @ q, abs=1e-4)


def test_a_shard_set_is_indexed_and_its_videos_served_from_the_shards(models, videos, tmp_path):
    from mmvssl.data.shards import build_shards
    from mmvssl.search.server import make_server
    build_shards(videos / "clips", tmp_path / "shards", samples_per_shard=3)
    counts = build_index(models["a"], str(tmp_path / "shards"), str(tmp_path / "idx"), window=1.0)
    assert (counts["videos"], counts["windows"]) == (4, 14)
    server = make_server(str(tmp_path / "idx"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, data, _ = request(server, "GET", "/api/search?q=circle&k=20")
        results = json.loads(data)["results"]
        assert len(results) == 14 and {r["video"] for r in results} == {f"{i:09d}" for i in range(4)}
        status, data, _ = request(server, "GET", "/media/1/000000002")
        assert status == 200 and data == (videos / "clips" / "clip2.mp4").read_bytes()
        assert request(server, "GET", "/media/1/000000002.json")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_past_the_threshold_the_index_is_approximate_and_answers_like_the_exact_one(models, videos, index, tmp_path):
    out = tmp_path / "ivf"
    build_index(models["a"], str(videos / "clips"), str(out), window=1.0, approx_threshold=1)
    db = sqlite3.connect(out / store.DB_NAME)
    assert {e["kind"] for e in store.get_info(db, "faiss").values()} == {"ivf"}
    db.close()
    clip = (videos / "clips" / "clip1.mp4").read_bytes()
    exact, approximate = Searcher(str(index)), Searcher(str(out))
    assert {k: e["kind"] for k, e in store.get_info(exact.db, "faiss").items()}["video_va"] == "flat"
    for searcher_query in ({"text": "a circle"}, {"video": clip}):  # 7 lists, all visited: same ranking
        a, b = exact.query(**searcher_query, k=14), approximate.query(**searcher_query, k=14)
        assert [(r["video"], r["start"], r["score"]) for r in a] == [(r["video"], r["start"], r["score"]) for r in b]


def test_index_commands(models, videos, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(videos / "clips" / "clip0.mp4", one / "clip0.mp4")
    out = str(tmp_path / "idx")
    assert main(["index", "build", models["a"], "--input", str(one), "--out", out, "--window", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("indexed 1 videos, 2 windows (1 videos embedded now")
    assert main(["index", "add", out, "--input", str(videos / "clips"), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("indexed 5 videos, 16 windows (4 videos embedded now")
    assert main(["index", "build", models["a"], "--input", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "index input not found" in capsys.readouterr().err


def test_ties_are_ordered_by_video_then_start_whatever_the_last_bits():
    from mmvssl.search.query import rank
    keys = [("b.mp4", 1.0, 1, 4), ("a.mp4", 2.0, 1, 3), ("a.mp4", 0.0, 1, 2), ("c.mp4", 0.0, 1, 1)]
    base = np.array([0.5, 0.5, 0.5, 0.9])
    rng = np.random.default_rng(0)
    for _ in range(50):  # perturbations the size of another CPU's rounding, in every order
        assert rank(base + rng.uniform(-2e-6, 2e-6, 4), keys) == [3, 2, 1, 0]
    assert rank(base + np.array([0, 1e-3, 0, 0]), keys) == [3, 1, 2, 0]  # a real difference is no tie
    # a run is tied with its best score, not chained: 0.5, 0.5 - 0.8 tol, 0.5 - 1.6 tol are two groups
    from mmvssl.evaluation.metrics import TIE_TOLERANCE as t
    assert rank(np.array([0.5 - 1.6 * t, 0.5 - 0.8 * t, 0.5, 0.9]), keys) == [3, 2, 1, 0]
    assert rank(np.array([0.5, 0.5 - 0.8 * t, 0.5 - 1.6 * t, 0.9]), keys) == [3, 1, 0, 2]
