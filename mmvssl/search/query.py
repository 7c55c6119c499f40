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
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch

from ..errors import MmvsslError
from ..evaluation.metrics import TIE_TOLERANCE
from . import store

NARRATION_WEIGHT = 0.3
MIN_CANDIDATES = 64


@dataclass
class Term:
    vector: np.ndarray  # (D,) unit
    space: str          # indexed space, e.g. video_vat
    weight: float


class Searcher:
    """An open index and its model; `search_*` are safe to call from several threads."""

    def __init__(self, index_dir: str, model_dir: str | None = None, narration_weight: float = NARRATION_WEIGHT):
        from ..data.text import tokenizer_for
        from ..evaluation.features import eval_spec, model_fingerprint, model_spaces
        from ..models.presets import load_model
        self.folder = Path(index_dir)
        self.db = store.connect(self.folder, readonly=True)
        if store.get_info(self.db, "state") != "ready":
            raise MmvsslError(f"search index {self.folder} is not complete (its build was interrupted or is running); "
                              f"re-run `mmvssl index build` to finish it")
        saved = store.get_info(self.db, "model")
        path = model_dir or saved["path"]
        self.model = load_model(path).eval()
        store.check_model(self.db, self.folder, model_fingerprint(self.model), self.model.name, path)
        self.settings = store.get_info(self.db, "settings")
        self.spec, self.spaces = eval_spec(self.model), model_spaces(self.model)
        self.faiss = {space: store.read_faiss_file(self.folder, entry)
                      for space, entry in store.get_info(self.db, "faiss", {}).items()}
        self.narration_weight = narration_weight
        self.tokenizer = tokenizer_for(self.model, self.spec.context_length)  # loading its vocabulary takes ~0.1 s
        self.lock = threading.Lock()  # one connection and one model, shared by the server's threads

    # ---- queries -> terms
    @torch.no_grad()
    def text_terms(self, text: str) -> list[Term]:
        if not text.strip():
            raise MmvsslError("empty text query")
        space = next((s for s in self.spaces.get("text", ()) if s in self.spaces.get("video", ())), None)
        if space is None:
            raise MmvsslError(f"model '{self.model.name}' has no text space shared with video; query with audio or video")
        tokens = self.tokenizer([text])  # (1, L)
        with self.lock:
            q = self.model.encode_text(tokens, space)[0].numpy()  # (D,)
        w = self.narration_weight if f"narration_{space}" in self.faiss else 0.0
        return [Term(q, f"video_{space}", 1.0 - w)] + ([Term(q, f"narration_{space}", w)] if w else [])

    def _window(self, start: float, end: float | None) -> tuple[float, float]:
        seconds = (end - start) if end is not None else self.settings["window"]
        if start < 0 or seconds <= 0:
            raise MmvsslError(f"query window [{start}, {end}] is empty or negative")
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
            clip = decode_window(data, start, self.spec.num_frames, self.spec.num_frames / seconds, self.spec.size, None)
        except DecodeError as e:
            raise MmvsslError(f"query video: {e}") from None
        video = frames_to_tensor(clip.frames)[None]  # (1, 3, T, H, W)
        return self._visual_terms(lambda space: self.model.encode_video(video, space))

    @torch.no_grad()
    def image_terms(self, data: bytes) -> list[Term]:
        from PIL import Image, ImageOps, UnidentifiedImageError
        from ..data.loader import frames_to_tensor
        try:
            img = ImageOps.fit(Image.open(io.BytesIO(data)).convert("RGB"), (self.spec.size, self.spec.size))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
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


def format_table(results: list[dict]) -> str:
    """The results as an aligned text table: video, start, end, score, narration."""
    rows = [("video", "start", "end", "score", "narration")]
    rows += [(r["video"], f"{r['start']:.2f}", f"{r['end']:.2f}", f"{r['score']:.4f}", r["narration"] or "")
             for r in results]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)
