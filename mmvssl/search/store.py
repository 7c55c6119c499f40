"""The search index on disk: a folder holding `index.sqlite` (metadata and every vector) and one
faiss file per embedding space, derived from the database.

index.sqlite (the source of truth, written in transactions so a killed build loses nothing it
committed and never keeps half a video):
  info(key, value)          JSON values: format, model {name, path, fingerprint}, window, stride,
                            narrator, state ('building' until the faiss files match the rows, then
                            'ready'), faiss {space: {file, kind, count, dim, sha256}}
  roots(id, path, kind)     an indexed input: a folder of videos ('folder') or a shard set ('shards')
  videos(id, root_id, source, shard, member, sha256, duration)
                            source: the path relative to the root (folder) or the sample key (shards);
                            shard + member: where a shard sample's video bytes are
  windows(id, video_id, start, end, thumb, narration, narration_score)   thumb: JPEG bytes
  vectors(window_id, space, vec)   vec: float32 bytes of an L2-normalised (D,) embedding
  rejected(root_id, source, reason)

<space>.faiss: the vectors of one space (video_va, video_vat, audio_va, narration_vat, ...) with the
window ids as faiss ids. Exact inner-product search (IndexFlatIP) up to APPROX_THRESHOLD vectors, an
inverted-file index (IndexIVFFlat: 2 sqrt(N) lists, 1/16 of them visited, at least 32) past it. Each file's sha256 is recorded in info, so a damaged
file is detected before faiss reads it. No pickle anywhere.

Concurrent use: one writer at a time (`index build` / `index add` hold index.lock, writer_lock;
a second one is refused with one line), any number of readers (the server) beside it, as the
database is in WAL mode. Video and window ids are AUTOINCREMENT, never reused after a deletion.
Files are written atomically (fsio: temp file, fsync, rename, fsync the folder).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import fsio
from ..errors import MmvsslError

FORMAT = "mmvssl-search-index/1"
DB_NAME = "index.sqlite"
APPROX_THRESHOLD = 100_000  # vectors; below it exact search is fast enough (docs/benchmarks/search.md)


def ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: 2 sqrt(n) (2,000 at 1M; k-means stays minutes on a CPU)."""
    return max(1, int(2 * math.sqrt(n)))


def ivf_nprobe(nlist: int) -> int:
    """Lists visited per query: at least 32, and 1/16 of them (recall@10 >= 0.95 at 1M vectors in
    eval/bench/search.py; 32 alone gave 0.92 there)."""
    return min(nlist, max(32, nlist // 16))

TABLES = {  # ids never reused (AUTOINCREMENT): a faiss file or a page read before a deletion never
    # names another video's window
    "info": "CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "roots": "CREATE TABLE IF NOT EXISTS roots (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, kind TEXT NOT NULL)",
    "videos": "CREATE TABLE IF NOT EXISTS videos (id INTEGER PRIMARY KEY AUTOINCREMENT, root_id INTEGER NOT NULL, "
              "source TEXT NOT NULL, shard TEXT, member TEXT, sha256 TEXT NOT NULL, duration REAL NOT NULL, "
              "UNIQUE (root_id, source))",
    "windows": 'CREATE TABLE IF NOT EXISTS windows (id INTEGER PRIMARY KEY AUTOINCREMENT, video_id INTEGER NOT NULL, '
               'start REAL NOT NULL, "end" REAL NOT NULL, thumb BLOB, narration TEXT, narration_score REAL)',
    "vectors": "CREATE TABLE IF NOT EXISTS vectors (window_id INTEGER NOT NULL, space TEXT NOT NULL, vec BLOB NOT NULL, "
               "PRIMARY KEY (window_id, space))",
    "rejected": "CREATE TABLE IF NOT EXISTS rejected (root_id INTEGER NOT NULL, source TEXT NOT NULL, reason TEXT NOT NULL)",
}
INDEXES = "CREATE INDEX IF NOT EXISTS windows_video ON windows (video_id);"
SCHEMA = ";\n".join(TABLES.values()) + ";\n" + INDEXES
LOCK_NAME = "index.lock"  # held by the one process writing the index (writer_lock)
OWNER_NAME = "index.lock.json"  # who holds it: {pid, command}


def _db_error(path: Path, e: Exception) -> MmvsslError:
    return MmvsslError(f"{path}: not a readable search index database ({e}); rebuild it with `mmvssl index build`")


def connect(index_dir: str | os.PathLike, create: bool = False, readonly: bool = False) -> sqlite3.Connection:
    """The index database; `create` makes the folder and tables, otherwise it must exist and be ours."""
    folder = Path(index_dir)
    path = folder / DB_NAME
    if not create and not path.is_file():
        raise MmvsslError(f"not a search index: {path} is missing (build one with `mmvssl index build`)")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if readonly:  # the server's threads share one read-only connection behind a lock
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:  # writers hold writer_lock; WAL lets the server read while one writes
            db = sqlite3.connect(path, timeout=30)
            try:
                db.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError:  # a reader holds the old journal: WAL on the next write
                pass
            db.executescript(SCHEMA)
            _never_reuse_ids(db)
        fmt = get_info(db, "format")
        if fmt is None and not readonly:
            set_info(db, "format", FORMAT)
            db.commit()
        elif fmt != FORMAT:
            raise MmvsslError(f"{path}: not a search index of this mmvssl (format {fmt!r}, expected {FORMAT!r})")
    except sqlite3.DatabaseError as e:
        raise _db_error(path, e) from None
    return db


def _never_reuse_ids(db: sqlite3.Connection) -> None:
    """An index written before ids were AUTOINCREMENT: its videos and windows tables are rebuilt
    as such in one transaction (rows and ids kept), so deleted ids are not handed out again."""
    for table in ("videos", "windows"):
        sql = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()[0]
        if "AUTOINCREMENT" in sql.upper():
            continue
        db.executescript(f"BEGIN IMMEDIATE; ALTER TABLE {table} RENAME TO {table}_old; {TABLES[table]}; "
                         f"INSERT INTO {table} SELECT * FROM {table}_old; DROP TABLE {table}_old; {INDEXES} COMMIT;")


@contextmanager
def writer_lock(index_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the index's writer lock (index.lock) for the block: `index build` / `index add` in two
    processes at once would interleave their transactions and ids. filelock (flock on POSIX,
    msvcrt on Windows; torch depends on it) is used rather than fcntl by hand: portable, and the
    kernel releases the lock when its process dies, so a killed writer leaves no stale lock. A second
    writer gets one line naming the index and the holder, and waits for nothing."""
    from filelock import FileLock, Timeout
    folder = Path(index_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = json.loads((folder / OWNER_NAME).read_text())
            holder = f" (pid {int(owner['pid'])}: {str(owner.get('command', ''))[:120]})"
        except (OSError, ValueError, KeyError, TypeError):
            holder = ""
        raise MmvsslError(f"search index {folder} is being written by another process{holder}; wait for it to "
                          f"finish, then run this again ({folder / LOCK_NAME} is released when that process "
                          f"exits)") from None
    try:
        atomic_write_json(folder / OWNER_NAME, {"pid": os.getpid(), "command": " ".join(sys.argv)})
        yield
    finally:
        lock.release()


def get_info(db: sqlite3.Connection, key: str, default=None):
    row = db.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
    return json.loads(row[0]) if row else default


def set_info(db: sqlite3.Connection, key: str, value) -> None:
    db.execute("INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)", (key, json.dumps(value)))


def to_blob(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype=np.float32).tobytes()


def from_blobs(blobs: list[bytes]) -> np.ndarray:
    """N float32 blobs of one space -> (N, D)."""
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)


# ---- faiss files

def make_faiss_index(vectors: np.ndarray, ids: np.ndarray, threshold: int = APPROX_THRESHOLD):
    """(N, D) float32 unit vectors with (N,) int64 ids -> a faiss index: exact (flat inner product)
    below `threshold` vectors, else IVF with ivf_lists(N) lists, k-means trained on a seeded sample of
    40 vectors per list (faiss asks for at least 39), visiting ivf_nprobe of them per query."""
    import faiss
    n, d = vectors.shape
    if n < threshold:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    else:
        nlist = ivf_lists(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = ivf_nprobe(nlist)
    index.add_with_ids(vectors, ids.astype(np.int64))
    return index


def index_kind(index) -> str:
    import faiss
    return "ivf" if isinstance(faiss.downcast_index(index), faiss.IndexIVF) else "flat"


def write_faiss_files(db: sqlite3.Connection, folder: Path, threshold: int = APPROX_THRESHOLD) -> dict:
    """Rebuild every space's faiss file from the vectors table (fsio.atomic_write_bytes); returns
    the info entry {space: {file, kind, count, dim, sha256}}. Spaces that lost all vectors are removed."""
    import faiss
    entries = {}
    spaces = [r[0] for r in db.execute("SELECT DISTINCT space FROM vectors ORDER BY space")]
    for space in spaces:
        rows = db.execute("SELECT window_id, vec FROM vectors WHERE space = ? ORDER BY window_id", (space,)).fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        index = make_faiss_index(from_blobs([r[1] for r in rows]), ids, threshold)
        data = faiss.serialize_index(index).tobytes()
        name = f"{space}.faiss"
        fsio.atomic_write_bytes(folder / name, data)
        entries[space] = {"file": name, "kind": index_kind(index), "count": len(ids), "dim": int(index.d),
                          "sha256": hashlib.sha256(data).hexdigest()}
    for stale in folder.glob("*.faiss"):
        if stale.stem not in entries:
            stale.unlink()
    return entries


def read_faiss_file(folder: Path, entry: dict):
    """One space's index, checked against the size and hash the database recorded."""
    import faiss
    path = folder / entry["file"]
    if not path.is_file():
        raise MmvsslError(f"{path} is missing from the search index; rebuild it with `mmvssl index build`")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise MmvsslError(f"{path} is corrupt (its content does not match the hash recorded in {DB_NAME}); "
                          f"rebuild it with `mmvssl index build`")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise MmvsslError(f"{path}: unreadable faiss index ({str(e).splitlines()[0][:120]})") from None
    if index.ntotal != entry["count"]:
        raise MmvsslError(f"{path} holds {index.ntotal} vectors, the database {entry['count']}; rebuild the index")
    if index_kind(index) == "ivf":  # nprobe is not serialised
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = ivf_nprobe(ivf.nlist)
    return index


def check_model(db: sqlite3.Connection, index_dir, fingerprint: str, name: str, path) -> None:
    """An index answers only queries embedded by the model that built it."""
    saved = get_info(db, "model")
    if saved and saved["fingerprint"] != fingerprint:
        raise MmvsslError(f"search index {index_dir} was built with model '{saved['name']}' ({saved.get('path')}, "
                          f"fingerprint {saved['fingerprint']}), not with '{name}' ({path}, fingerprint {fingerprint}); "
                          f"query it with the model that built it, or build a new index with this one")


def atomic_write_json(path: Path, value) -> None:
    fsio.atomic_write_json(path, value)  # temp file, fsync, rename, fsync the folder
