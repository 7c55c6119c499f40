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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from pathlib import Path

import numpy as np

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

SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS roots (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, kind TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS videos (id INTEGER PRIMARY KEY, root_id INTEGER NOT NULL, source TEXT NOT NULL,
  shard TEXT, member TEXT, sha256 TEXT NOT NULL, duration REAL NOT NULL, UNIQUE (root_id, source));
CREATE TABLE IF NOT EXISTS windows (id INTEGER PRIMARY KEY, video_id INTEGER NOT NULL, start REAL NOT NULL,
  "end" REAL NOT NULL, thumb BLOB, narration TEXT, narration_score REAL);
CREATE INDEX IF NOT EXISTS windows_video ON windows (video_id);
CREATE TABLE IF NOT EXISTS vectors (window_id INTEGER NOT NULL, space TEXT NOT NULL, vec BLOB NOT NULL,
  PRIMARY KEY (window_id, space));
CREATE TABLE IF NOT EXISTS rejected (root_id INTEGER NOT NULL, source TEXT NOT NULL, reason TEXT NOT NULL);
"""


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
        else:
            db = sqlite3.connect(path)
            db.executescript(SCHEMA)
        fmt = get_info(db, "format")
        if fmt is None and not readonly:
            set_info(db, "format", FORMAT)
            db.commit()
        elif fmt != FORMAT:
            raise MmvsslError(f"{path}: not a search index of this mmvssl (format {fmt!r}, expected {FORMAT!r})")
    except sqlite3.DatabaseError as e:
        raise _db_error(path, e) from None
    return db


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
    """Rebuild every space's faiss file from the vectors table (temp file, then rename); returns
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
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
