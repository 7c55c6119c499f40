"""Queries against a search index: text, a sound, a video clip or an image, embedded by the model
that built the index (checked by fingerprint) and scored against the windows' vectors.

A query is a list of terms (query vector, indexed space, weight); a window's score is the
weighted sum of its cosine similarities over the terms (a window without that space, e.g. no
audio track, scores 0 there). The mix (docs/search.md):
  text   (1 - w) * cos(text, video_vat) + w * cos(text, narration_vat)   w = narration_weight (0.3)
         when the index has narrations, else cos(text, video_vat)
  audio  cos(audio_va, audio_va)           "sounds like this": the windows' own sound
  video  mean over the video spaces s of cos(video_s, video_s)   "more like this scene"
  image  mean over the video spaces s of cos(image_s, video_s)   (the still through the video tower)
Each term's faiss index proposes candidates (exact search, or IVF past the size threshold); the
union is then scored exactly from the stored vectors and ranked by `rank`: score, and within a
tie (scores within evaluation.metrics.TIE_TOLERANCE) by video path, then start.

Queries may come from a web page (`mmvssl serve`), so their cost is bounded before any work: a text
of at most max_text_chars characters (CLIP's BPE is quadratic in the length of a word), an audio or
video span of at most max_query_seconds (the audio tower is quadratic in its length), finite times,
and images and video frames of at most max_pixels, read from the file's header before decoding.
An index changed by another process (`index add` while serving) is noticed before each query and
reloaded once it is ready again (Searcher.refresh).
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch

from ..errors import MmvsslError
from ..evaluation.metrics import TIE_TOLERANCE
from . import store
from .limits import MAX_QUERY_SECONDS, MAX_START_SECONDS, MAX_TEXT_CHARS

NARRATION_WEIGHT = 0.3
MIN_CANDIDATES = 64


@dataclass
class Term:
    vector: np.ndarray  # (D,) unit
    space: str          # indexed space, e.g. video_vat
    weight: float


class Searcher:
    """An open index and its model; `search_*` are safe to call from several threads."""

    def __init__(self, index_dir: str, model_dir: str | None = None, narration_weight: float = NARRATION_WEIGHT,
                 max_query_seconds: float = MAX_QUERY_SECONDS, max_text_chars: int = MAX_TEXT_CHARS,
                 max_pixels: int | None = None):
        from ..data.decode import MAX_PIXELS
        from ..data.text import tokenizer_for
        from ..evaluation.features import eval_spec, model_spaces
        from ..models.presets import load_model
        self.folder = Path(index_dir)
        self.lock = threading.Lock()  # one connection and one model, shared by the server's threads
        self._reload_lock = threading.Lock()  # one reload at a time
        self.db = None
        db = self._connect_ready()
        saved = store.get_info(db, "model")
        db.close()
        self.model_path = model_dir or saved["path"]
        self.model = load_model(self.model_path).eval()
        self._open_index()
        self.spec, self.spaces = eval_spec(self.model), model_spaces(self.model)
        self.narration_weight = narration_weight
        self.max_query_seconds, self.max_text_chars = float(max_query_seconds), int(max_text_chars)
        self.max_pixels = int(max_pixels or MAX_PIXELS)
        self.tokenizer = tokenizer_for(self.model, self.spec.context_length)  # loading its vocabulary takes ~0.1 s

    # ---- the index on disk, reloaded when another process changes it
    def _connect_ready(self):
        db = store.connect(self.folder, readonly=True)
        if store.get_info(db, "state") != "ready":
            db.close()
            raise MmvsslError(f"search index {self.folder} is not complete (its build was interrupted or is running); "
                              f"re-run `mmvssl index build` to finish it")
        return db

    def _open_index(self) -> None:
        """(Re)open the database and the faiss files it records, for this Searcher's model."""
        from ..evaluation.features import model_fingerprint
        db_id = _file_id(self.folder / store.DB_NAME)
        db = self._connect_ready()
        try:
            store.check_model(db, self.folder, model_fingerprint(self.model), self.model.name, self.model_path)
            settings, faiss_info = store.get_info(db, "settings"), store.get_info(db, "faiss", {})
            faiss = {space: store.read_faiss_file(self.folder, entry) for space, entry in faiss_info.items()}
        except BaseException:
            db.close()
            raise
        with self.lock:
            old, self.db = self.db, db
            self.settings, self.faiss, self.faiss_info, self._db_id = settings, faiss, faiss_info, db_id
        if old is not None:
            old.close()

    def refresh(self) -> bool:
        """Notice an index changed by another process since it was read, and reload it; True if reloaded.

        `index add` / `index build` commit videos batch by batch, rewrite the faiss files, then set the
        state 'ready' with the files' new hashes. Until then the loaded faiss files keep answering (a
        window deleted meanwhile is left out of the results); once the state is 'ready' with other faiss
        entries, those files are read and checked against their recorded hashes (a file rewritten again
        meanwhile keeps the old ones until the next query). A database file replaced by a new one (a
        folder rebuilt from scratch) is reopened and its model checked again.
        """
        with self._reload_lock:
            if _file_id(self.folder / store.DB_NAME) != self._db_id:
                self._open_index()
                return True
            with self.lock:
                rows = dict(self.db.execute("SELECT key, value FROM info WHERE key IN ('state', 'faiss')").fetchall())
            if json.loads(rows.get("state", "null")) != "ready":
                return False
            faiss_info = json.loads(rows.get("faiss", "{}"))
            if faiss_info == self.faiss_info:
                return False
            try:
                faiss = {space: store.read_faiss_file(self.folder, entry) for space, entry in faiss_info.items()}
            except MmvsslError:
                return False  # rewritten again since the state was read: the next query retries
            with self.lock:
                self.faiss, self.faiss_info = faiss, faiss_info
            return True

    # ---- queries -> terms
    @torch.no_grad()
    def text_terms(self, text: str) -> list[Term]:
        if not text.strip():
            raise MmvsslError("empty text query")
        if len(text) > self.max_text_chars:
            raise MmvsslError(f"text query of {len(text)} characters exceeds the limit of {self.max_text_chars} "
                              f"characters (max_text_chars)")
        space = next((s for s in self.spaces.get("text", ()) if s in self.spaces.get("video", ())), None)
        if space is None:
            raise MmvsslError(f"model '{self.model.name}' has no text space shared with video; query with audio or video")
        tokens = self.tokenizer([text])  # (1, L)
        with self.lock:
            q = self.model.encode_text(tokens, space)[0].numpy()  # (D,)
        w = self.narration_weight if f"narration_{space}" in self.faiss else 0.0
        return [Term(q, f"video_{space}", 1.0 - w)] + ([Term(q, f"narration_{space}", w)] if w else [])

    def _window(self, start: float, end: float | None) -> tuple[float, float]:
        if not math.isfinite(start) or (end is not None and not math.isfinite(end)):
            raise MmvsslError(f"query window [{start}, {end}]: start and end must be finite numbers of seconds")
        seconds = (end - start) if end is not None else self.settings["window"]
        if start < 0 or seconds <= 0:
            raise MmvsslError(f"query window [{start}, {end}] is empty or negative")
        if seconds > self.max_query_seconds:
            raise MmvsslError(f"query window [{start}, {end}] of {seconds:g} s exceeds the limit of "
                              f"{self.max_query_seconds:g} s (max_query_seconds)")
        if start > MAX_START_SECONDS:
            raise MmvsslError(f"query start {start:g} s is past the limit of {MAX_START_SECONDS:g} s")
        return start, seconds

    @torch.no_grad()
    def audio_terms(self, data: bytes, start: float = 0.0, end: float | None = None) -> list[Term]:
        from ..data.decode import DecodeError, decode_audio
        start, seconds = self._window(start, end)
        try:
            audio = torch.from_numpy(decode_audio(data, start, seconds, self.spec.audio_rate))[None]  # (1, S)
        except DecodeError as e:
            raise MmvsslError(f"query audio: {e}") from None
        spaces = [s for s in self.spaces.get("audio", ()) if f"audio_{s}" in self.faiss][:1]
        if not spaces:
            raise MmvsslError(f"search index {self.folder} has no audio embeddings (its videos had no sound)")
        with self.lock:
            q = self.model.encode_audio(audio, spaces[0])[0].numpy()
        return [Term(q, f"audio_{spaces[0]}", 1.0)]

    @torch.no_grad()
    def video_terms(self, data: bytes, start: float = 0.0, end: float | None = None) -> list[Term]:
        from ..data.decode import DecodeError, decode_window
        from ..data.loader import frames_to_tensor
        start, seconds = self._window(start, end)
        try:
            clip = decode_window(data, start, self.spec.num_frames, self.spec.num_frames / seconds, self.spec.size,
                                 None, max_pixels=self.max_pixels)
        except DecodeError as e:
            raise MmvsslError(f"query video: {e}") from None
        video = frames_to_tensor(clip.frames)[None]  # (1, 3, T, H, W)
        return self._visual_terms(lambda space: self.model.encode_video(video, space))

    @torch.no_grad()
    def image_terms(self, data: bytes) -> list[Term]:
        from PIL import Image, ImageOps, UnidentifiedImageError
        from ..data.loader import frames_to_tensor
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise MmvsslError(f"query image: not a readable image ({e})") from None
        width, height = img.size
        if width * height > self.max_pixels:  # before decoding: a 20 KB PNG can hold 13000 x 13000 pixels
            raise MmvsslError(f"query image: size {width}x{height} exceeds the limit of {self.max_pixels} pixels")
        try:
            img = ImageOps.fit(img.convert("RGB"), (self.spec.size, self.spec.size))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise MmvsslError(f"query image: not a readable image ({e})") from None
        image = frames_to_tensor(np.array(img)[None])[:, 0][None]  # (1, 3, H, W)
        return self._visual_terms(lambda space: self.model.encode_image(image, space))

    def _visual_terms(self, encode) -> list[Term]:
        spaces = [s for s in self.spaces.get("video", ()) if f"video_{s}" in self.faiss]
        with self.lock:
            return [Term(encode(s)[0].numpy(), f"video_{s}", 1.0 / len(spaces)) for s in spaces]

    # ---- terms -> ranked windows
    def search(self, terms: list[Term], k: int = 10) -> list[dict]:
        k = max(1, min(int(k), 1000))
        missing = [t.space for t in terms if t.space not in self.faiss]
        terms = [t for t in terms if t.space in self.faiss]
        if not terms:
            raise MmvsslError(f"search index {self.folder} has no {', '.join(missing)} vectors (no video indexed?)")
        candidates: set[int] = set()
        for t in terms:
            index = self.faiss[t.space]
            _, ids = index.search(t.vector[None].astype(np.float32), max(4 * k, MIN_CANDIDATES))  # (1, C)
            candidates.update(int(i) for i in ids[0] if i >= 0)
        if not candidates:
            return []
        ids = sorted(candidates)
        scores = np.zeros(len(ids), dtype=np.float64)
        pos = {wid: n for n, wid in enumerate(ids)}
        marks = ",".join("?" * len(ids))
        with self.lock:
            for t in terms:
                rows = self.db.execute(f"SELECT window_id, vec FROM vectors WHERE space = ? AND window_id IN ({marks})",
                                       (t.space, *ids)).fetchall()
                if rows:
                    sims = store.from_blobs([r[1] for r in rows]) @ t.vector  # (N,)
                    for (wid, _), s in zip(rows, sims):
                        scores[pos[wid]] += t.weight * float(s)
            meta = {r[0]: r[1:] for r in self.db.execute(
                f'SELECT w.id, v.source, v.root_id, w.start, w."end", w.narration FROM windows w '
                f"JOIN videos v ON v.id = w.video_id WHERE w.id IN ({marks})", ids)}
        if len(meta) < len(ids):  # windows deleted since the faiss files were read (an `index add` is running)
            keep = [n for n, wid in enumerate(ids) if wid in meta]
            ids, scores = [ids[n] for n in keep], scores[keep]
            pos = {wid: n for n, wid in enumerate(ids)}
        keys = [(meta[wid][0], meta[wid][2], meta[wid][1], wid) for wid in ids]  # video, start, root, window
        top = [ids[n] for n in rank(scores, keys)[:k]]
        return [{"video": meta[wid][0], "start": meta[wid][2], "end": meta[wid][3], "score": round(float(scores[pos[wid]]), 4),
                 "narration": meta[wid][4], "window": wid,
                 "media": f"/media/{meta[wid][1]}/{quote(meta[wid][0])}", "thumb": f"/thumb/{wid}"} for wid in top]

    def query(self, text: str | None = None, audio: bytes | None = None, video: bytes | None = None,
              image: bytes | None = None, start: float = 0.0, end: float | None = None, k: int = 10) -> list[dict]:
        given = [n for n, v in (("text", text), ("audio", audio), ("video", video), ("image", image)) if v is not None]
        if len(given) != 1:
            raise MmvsslError(f"give exactly one query (text, --audio, --video or --image), got {len(given)}")
        self.refresh()
        if text is not None:
            return self.search(self.text_terms(text), k)
        if audio is not None:
            return self.search(self.audio_terms(audio, start, end), k)
        if video is not None:
            return self.search(self.video_terms(video, start, end), k)
        return self.search(self.image_terms(image), k)


def rank(scores: np.ndarray, keys: list) -> list[int]:
    """Positions of `scores` best first, in a documented order that does not depend on the CPU:
    descending score, where scores within TIE_TOLERANCE of the best score of their run are a tie,
    and a tie is ordered by its keys (video path, start, root, window id). Exact float order inside
    a tie would differ between BLAS kernels and processors (docs/search.md, "Ranking")."""
    order = sorted(range(len(scores)), key=lambda n: (-scores[n], keys[n]))
    ranked, n = [], 0
    while n < len(order):
        head, run = scores[order[n]], []
        while n < len(order) and scores[order[n]] >= head - TIE_TOLERANCE:  # the run tied with its best
            run.append(order[n])
            n += 1
        ranked += sorted(run, key=lambda m: keys[m])
    return ranked


def _file_id(path: Path) -> tuple[int, int]:
    """(device, inode) of the database file: another one at the same path is a new index."""
    try:
        st = os.stat(path)
    except OSError:
        raise MmvsslError(f"not a search index: {path} is missing (build one with `mmvssl index build`)") from None
    return st.st_dev, st.st_ino


def format_table(results: list[dict]) -> str:
    """The results as an aligned text table: video, start, end, score, narration."""
    rows = [("video", "start", "end", "score", "narration")]
    rows += [(r["video"], f"{r['start']:.2f}", f"{r['end']:.2f}", f"{r['score']:.4f}", r["narration"] or "")
             for r in results]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)
