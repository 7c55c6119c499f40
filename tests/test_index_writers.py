"""Concurrent writers of a search index (issue 29, "Concurrent writers and durability"): one writer at
a time behind index.lock, refused with one line naming the holder, tried with real processes; the
database in WAL mode, so a reader reads beside a writer; window ids never reused after a deletion
(a faiss file read before the deletion must never name another video's window), also in an index
written before ids were AUTOINCREMENT."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmvssl.errors import MmvsslError
from mmvssl.search import store
from mmvssl.search.index import add_to_index, build_index
from tests.conftest import make_video

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from mmvssl.models.presets import create_model
    folder = tmp_path_factory.mktemp("writers-model") / "m"
    torch.manual_seed(0)
    create_model("vatt-tiny").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Folders a (two clips), b and c (one clip each), 1 s long, tones apart."""
    root = tmp_path_factory.mktemp("writers-videos")
    for folder, name, hz in (("a", "a0", 300), ("a", "a1", 500), ("b", "b0", 800), ("c", "c0", 1300)):
        make_video(root / folder / f"{name}.mp4", seconds=1.0, fps=10, tone_hz=hz)
    return root


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmvssl.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def windows(index: Path) -> dict[int, str]:
    db = sqlite3.connect(index / store.DB_NAME)
    try:
        return dict(db.execute("SELECT w.id, v.source FROM windows w JOIN videos v ON v.id = w.video_id"))
    finally:
        db.close()


def test_a_second_writer_process_is_refused_with_one_line_naming_the_holder(model, clips, tmp_path):
    index = tmp_path / "idx"
    build_index(model, str(clips / "a"), str(index), window=1.0)
    holder = subprocess.Popen(  # another process holding the writer lock, as a running `index add` does
        [sys.executable, "-c", "import sys; from mmvssl.search import store\n"
                               f"with store.writer_lock({str(index)!r}):\n"
                               "    print('held', flush=True); sys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = cli("index", "add", str(index), "--input", str(clips / "b"), "--quiet")
        out, err = second.communicate(timeout=300)
        assert second.returncode == 2, err
        assert err.strip().splitlines() == [
            f"mmvssl: error: search index {index} is being written by another process (pid {holder.pid}: -c); "
            f"wait for it to finish, then run this again ({index / store.LOCK_NAME} is released when that "
            f"process exits)"]
        with pytest.raises(MmvsslError, match="is being written by another process"):  # in-process too
            add_to_index(str(index), str(clips / "b"))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert sorted(windows(index).values()) == ["a0.mp4", "a1.mp4"]  # the refused writers wrote nothing
    add_to_index(str(index), str(clips / "b"))  # the lock went with its process
    assert sorted(windows(index).values()) == ["a0.mp4", "a1.mp4", "b0.mp4"]


def test_two_index_add_processes_at_once_never_corrupt_the_index(model, clips, tmp_path):
    index = tmp_path / "idx"
    build_index(model, str(clips / "a"), str(index), window=1.0)
    procs = [cli("index", "add", str(index), "--input", str(clips / name), "--quiet") for name in ("b", "c")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for code, err in results:  # each one either ran, or was refused with the one line (never an IntegrityError)
        assert code == 0 or (code == 2 and len(err.strip().splitlines()) == 1
                             and "is being written by another process" in err), err
        assert "Traceback" not in err and "IntegrityError" not in err
    done = {name for name, (code, _) in zip("bc", results) if code == 0}
    assert done, results
    for name in {"b", "c"} - done:  # the refused one, run again
        add_to_index(str(index), str(clips / name))
    assert sorted(windows(index).values()) == ["a0.mp4", "a1.mp4", "b0.mp4", "c0.mp4"]
    db = sqlite3.connect(index / store.DB_NAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT COUNT(*) FROM vectors WHERE window_id NOT IN (SELECT id FROM windows)").fetchone()[0] == 0
    db.close()


def test_window_ids_are_never_reused_after_a_video_leaves(model, clips, tmp_path):
    folder = tmp_path / "videos"
    shutil.copytree(clips / "a", folder)
    index = tmp_path / "idx"
    build_index(model, str(folder), str(index), window=1.0)
    before = windows(index)
    last = max(before)
    assert before[last] == "a1.mp4"  # the newest window: a plain rowid would hand its id out again
    (folder / "a1.mp4").unlink()
    build_index(model, str(folder), str(index), window=1.0)  # a1 dropped
    add_to_index(str(index), str(clips / "c"))
    after = windows(index)
    assert sorted(after.values()) == ["a0.mp4", "c0.mp4"]
    assert min(i for i, src in after.items() if src == "c0.mp4") > last


def test_an_index_written_before_autoincrement_is_migrated_with_its_rows(tmp_path):
    index = tmp_path / "old"
    index.mkdir()
    db = sqlite3.connect(index / store.DB_NAME)
    db.executescript(  # the schema of earlier versions: plain INTEGER PRIMARY KEY ids
        "CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE videos (id INTEGER PRIMARY KEY, root_id INTEGER NOT NULL, source TEXT NOT NULL, shard TEXT, "
        "member TEXT, sha256 TEXT NOT NULL, duration REAL NOT NULL, UNIQUE (root_id, source));"
        'CREATE TABLE windows (id INTEGER PRIMARY KEY, video_id INTEGER NOT NULL, start REAL NOT NULL, "end" REAL '
        "NOT NULL, thumb BLOB, narration TEXT, narration_score REAL);"
        "CREATE INDEX windows_video ON windows (video_id);"
        f"INSERT INTO info VALUES ('format', '\"{store.FORMAT}\"');"
        "INSERT INTO videos VALUES (1, 1, 'x.mp4', NULL, NULL, 'h', 2.0), (2, 1, 'y.mp4', NULL, NULL, 'g', 1.0);"
        "INSERT INTO windows VALUES (1, 1, 0, 1, NULL, NULL, NULL), (2, 1, 1, 2, NULL, NULL, NULL),"
        " (3, 2, 0, 1, NULL, NULL, NULL);")
    db.commit()
    db.close()
    with store.writer_lock(index):
        db = store.connect(index)
        assert db.execute("SELECT id, video_id, start FROM windows ORDER BY id").fetchall() == [(1, 1, 0), (2, 1, 1), (3, 2, 0)]
        with db:
            db.execute("DELETE FROM windows WHERE id = 3")
            new = db.execute('INSERT INTO windows (video_id, start, "end") VALUES (1, 2, 3)').lastrowid
        assert new == 4  # not 3 again
        assert "AUTOINCREMENT" in db.execute("SELECT sql FROM sqlite_master WHERE name = 'videos'").fetchone()[0]
        assert db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'windows_video'").fetchone()
        db.close()


def test_a_reader_reads_the_committed_state_while_a_writer_is_mid_transaction(tmp_path):
    index = tmp_path / "idx"
    with store.writer_lock(index):
        writer = store.connect(index, create=True)
        with writer:
            store.set_info(writer, "state", "ready")
        writer.execute("BEGIN IMMEDIATE")
        store.set_info(writer, "state", "building")  # not committed yet
        reader = store.connect(index, readonly=True)
        assert store.get_info(reader, "state") == "ready"
        writer.commit()
        assert store.get_info(reader, "state") == "building"
        reader.close()
        writer.close()
