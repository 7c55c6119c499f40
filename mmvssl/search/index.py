"""`mmvssl index build / add`: every video of a folder or a shard set cut into windows, each window
embedded in every space the model has (video and audio), with a thumbnail, its time span and,
with a narrator, its pseudo-narration (embedded in the text spaces too). Storage: store.py.

Windows start every `stride` seconds while a whole window fits (as `mmvssl narrate` cuts them); a
video shorter than the window gets one window from 0. The model always sees its own num_frames
frames per window (fps = num_frames / window), so --window changes the time span, not the input.

Resumable: windows are embedded in batches and a batch's videos are committed in one transaction,
so a kill loses at most the uncommitted batch (redone on the next run) and never stores half a
video. A video already in the index with the same content hash is skipped; a changed one is
re-embedded; one that vanished from the input (or is now rejected) is dropped. The faiss files are
rebuilt from the database at the end and the index is marked 'ready' only then.
"""

from __future__ import annotations

import hashlib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..data.decode import DecodeError, decode_window, probe
from ..data.loader import frames_to_tensor, list_shards
from ..data.rawsample import REFUSED, video_member
from ..data.sampling import sliding_windows
from ..data.shardio import skip_unreadable_shard
from ..data.shards import BuildReport, read_entries
from ..errors import MmvsslError
from ..fsio import inside
from . import store

THUMB_SHORT_SIDE = 144
NARRATION_MAX_TOKENS = 40


@dataclass
class Video:
    """One input video: where it is and its bytes (None with `error` when it cannot be read)."""
    source: str
    data: bytes | None
    shard: str | None = None
    member: str | None = None
    error: str | None = None


@dataclass
class Pending:
    """A video whose windows are being embedded; committed once all of them are."""
    video: Video
    sha256: str
    duration: float
    replaces: int | None
    starts: list[float]
    thumbs: list[bytes | None] = field(default_factory=list)
    vectors: dict[str, list[np.ndarray | None]] = field(default_factory=dict)  # space -> per window (D,)
    narrations: list[tuple[str, float] | None] = field(default_factory=list)

    def put(self, space: str, w: int, vec: np.ndarray) -> None:
        self.vectors.setdefault(space, [None] * len(self.starts))[w] = vec


@dataclass
class Queued:
    """One decoded window waiting for a full batch: (3, T, H, W) frames, (S,) audio or None."""
    item: Pending
    w: int
    frames: torch.Tensor
    audio: np.ndarray | None




def is_video_folder(source: str) -> bool:
    path = Path(source)
    return path.is_dir() and not list(path.glob("*.tar"))


def scan(source: str, report: BuildReport) -> Iterator[Video]:
    """The videos of a folder (sorted; symlinks that leave the folder are rejected) or a shard set."""
    if is_video_folder(source):
        root = Path(source).resolve()
        for _, entry in read_entries(root, None, report):
            rel = entry["video"]
            if inside(root, rel) is None:  # the one containment rule (shards build, datasets cut)
                yield Video(rel, None, error="symlink out of the collection")
                continue
            try:
                yield Video(rel, (root / rel).read_bytes())
            except OSError as e:
                yield Video(rel, None, error=f"unreadable ({e.strerror or e})")
        return
    from ..data.shardio import absolute_url, tar_samples  # members over the size limit refused unread
    for sample in tar_samples([{"url": url} for url in list_shards(source)], skip_unreadable_shard):
        ext = video_member(sample)
        key, url = sample["__key__"], absolute_url(sample["__url__"], resolve=True)
        if ext is None:  # none, or one over the size limit (refused unread)
            refused = sample.get(REFUSED)
            yield Video(key, None, error=refused.decode("utf-8", errors="replace") if refused else "no video member")
        else:
            yield Video(key, sample[ext], shard=url, member=f"{key}.{ext}")


def jpeg(frame: np.ndarray) -> bytes:
    from PIL import Image  # Pillow comes with matplotlib
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=80)
    return out.getvalue()


class Indexer:
    """Embeds batches of windows with the model (and narrator) and commits them to the database."""

    def __init__(self, model, window: float, stride: float, narrator_dir: str | None = None, batch_size: int = 16):
        from ..data.text import tokenizer_for
        from ..evaluation.features import eval_spec, model_spaces
        self.model, self.window, self.stride, self.batch_size = model.eval(), window, stride, batch_size
        self.spec, self.spaces = eval_spec(model), model_spaces(model)
        self.fps = self.spec.num_frames / window  # the model's frame count over the chosen window
        self.tokenizer = tokenizer_for(model, self.spec.context_length)
        self.narrator = None
        if narrator_dir:
            from ..narrator.model import Narrator
            from ..narrator.tokenizer import SentencePieceTokenizer
            self.narrator = Narrator.from_pretrained(narrator_dir).eval()
            self.narrator_tok = SentencePieceTokenizer(Path(narrator_dir) / self.narrator.config.get("tokenizer",
                                                                                                     "tokenizer.model"))
            self.narrator_sampling = self.narrator.config.get("sampling", {"num_frames": 8, "fps": 4.0, "size": 64})

    def open(self, video: Video, sha: str, replaces: int | None) -> Pending:
        duration = float(probe(video.data).duration)
        return Pending(video, sha, duration, replaces, sliding_windows(duration, self.window, self.stride))

    def decode(self, item: Pending, w: int) -> Queued:
        """Window w of the item, decoded as the model sees it; its thumbnail goes into the item."""
        start, data = item.starts[w], item.video.data
        clip = decode_window(data, start, self.spec.num_frames, self.fps, self.spec.size,
                             self.spec.audio_rate if "audio" in self.model.encoders else None)
        mid = min(start + self.window / 2, max(item.duration - 0.05, 0.0))
        try:
            item.thumbs.append(jpeg(decode_window(data, mid, 1, 1.0, None, None, short_side=THUMB_SHORT_SIDE).frames[0]))
        except DecodeError:
            item.thumbs.append(None)
        return Queued(item, w, frames_to_tensor(clip.frames), clip.audio)

    @torch.no_grad()
    def embed(self, queue: list[Queued]) -> None:
        """Every queued window's vectors (and narration) into its item; at most batch_size per model call."""
        from ..evaluation.features import embed_modality
        for c in range(0, len(queue), self.batch_size):
            rows = queue[c:c + self.batch_size]
            if "video" in self.model.encoders:
                video = torch.stack([q.frames for q in rows])  # (B, 3, T, H, W)
                for name, x in embed_modality(self.model, "video", video, self.spaces["video"]).items():
                    if not name.endswith("_pooled"):
                        for q, v in zip(rows, x.numpy()):
                            q.item.put(name, q.w, v)
            heard = [q for q in rows if q.audio is not None]
            if heard and "audio" in self.model.encoders:
                audio = torch.stack([torch.from_numpy(q.audio) for q in heard])  # (B, S)
                for name, x in embed_modality(self.model, "audio", audio, self.spaces["audio"]).items():
                    if not name.endswith("_pooled"):
                        for q, v in zip(heard, x.numpy()):
                            q.item.put(name, q.w, v)
            if self.narrator is not None:
                self.narrate(rows)

    def narrate(self, rows: list[Queued]) -> None:
        """The narrator's best (greedy) narration of each window, and its embedding in the text spaces."""
        from ..evaluation.features import embed_modality
        from ..narrator.generate import GenerationConfig, generate
        s = self.narrator_sampling
        gen = GenerationConfig(num_candidates=1, strategy="greedy", max_length=NARRATION_MAX_TOKENS)
        clips = [decode_window(q.item.video.data, q.item.starts[q.w], s["num_frames"], s["num_frames"] / self.window,
                               s["size"], None) for q in rows]
        video = torch.stack([frames_to_tensor(clip.frames) for clip in clips])  # (B, 3, T, H, W)
        best = [cands[0] for cands in generate(self.narrator, video, gen)]
        texts = [self.narrator_tok.decode(b["tokens"]) for b in best]
        for q, text, b in zip(rows, texts, best):
            if not q.item.narrations:
                q.item.narrations = [None] * len(q.item.starts)
            q.item.narrations[q.w] = (text, float(b["score"]))
        if "text" in self.model.encoders:
            tokens = self.tokenizer(texts)  # (B, L)
            for name, x in embed_modality(self.model, "text", tokens, self.spaces["text"]).items():
                if not name.endswith("_pooled"):
                    for q, v in zip(rows, x.numpy()):
                        q.item.put(name.replace("text_", "narration_", 1), q.w, v)


def _delete_video(db, video_id: int) -> None:
    db.execute("DELETE FROM vectors WHERE window_id IN (SELECT id FROM windows WHERE video_id = ?)", (video_id,))
    db.execute("DELETE FROM windows WHERE video_id = ?", (video_id,))
    db.execute("DELETE FROM videos WHERE id = ?", (video_id,))


def store_batch(db, root_id: int, items: list[Pending], window: float) -> None:
    """Insert embedded videos (the caller commits: all of them or none)."""
    for item in items:
        if item.replaces is not None:
            _delete_video(db, item.replaces)
        v = item.video
        video_id = db.execute("INSERT INTO videos (root_id, source, shard, member, sha256, duration) "
                              "VALUES (?, ?, ?, ?, ?, ?)",
                              (root_id, v.source, v.shard, v.member, item.sha256, item.duration)).lastrowid
        for w, start in enumerate(item.starts):
            text, score = item.narrations[w] if item.narrations else (None, None)
            window_id = db.execute('INSERT INTO windows (video_id, start, "end", thumb, narration, narration_score) '
                                   "VALUES (?, ?, ?, ?, ?, ?)",
                                   (video_id, start, round(start + window, 3), item.thumbs[w], text, score)).lastrowid
            for space, per_window in item.vectors.items():
                if per_window[w] is not None:
                    db.execute("INSERT INTO vectors (window_id, space, vec) VALUES (?, ?, ?)",
                               (window_id, space, store.to_blob(per_window[w])))


def sync_root(db, indexer: Indexer, source: str, progress: bool = False) -> dict:
    """Bring one input (folder or shard set) up to date in the index; returns its counts."""
    kind = "folder" if is_video_folder(source) else "shards"
    root_path = str(Path(source).resolve()) if kind == "folder" else source
    db.execute("INSERT OR IGNORE INTO roots (path, kind) VALUES (?, ?)", (root_path, kind))
    root_id = db.execute("SELECT id FROM roots WHERE path = ?", (root_path,)).fetchone()[0]
    db.commit()
    known = {src: (vid, sha) for vid, src, sha in
             db.execute("SELECT id, source, sha256 FROM videos WHERE root_id = ?", (root_id,))}
    report, seen = BuildReport(), set()
    queue: list[Queued] = []   # decoded windows, embedded batch_size at a time (memory stays bounded)
    done: list[Pending] = []   # videos whose windows are all decoded, committed together
    counts = {"videos": 0, "windows": 0, "kept": 0, "dropped": 0}

    def commit():
        indexer.embed(queue)
        queue.clear()
        with db:  # one transaction: every video of the batch, or (killed) none
            store_batch(db, root_id, done, indexer.window)
        counts["videos"] += len(done)
        counts["windows"] += sum(len(p.starts) for p in done)
        done.clear()

    videos = scan(source, report)
    if progress:
        from tqdm import tqdm
        videos = tqdm(videos, desc="index", unit="video", file=sys.stderr)
    for video in videos:
        if video.data is None:
            report.reject(video.source, video.error or "unreadable")
            continue
        if video.source in seen:  # a key twice in a shard set
            report.reject(video.source, "duplicate of an earlier video with the same key")
            continue
        sha = hashlib.sha256(video.data).hexdigest()
        old_id, old_sha = known.get(video.source, (None, None))
        if old_sha == sha:
            seen.add(video.source)
            counts["kept"] += 1
            continue
        item = None
        try:
            item = indexer.open(video, sha, old_id)
            for w in range(len(item.starts)):  # a long video is embedded batch by batch before it is committed
                queue.append(indexer.decode(item, w))
                if len(queue) >= indexer.batch_size:
                    indexer.embed(queue)
                    queue.clear()
        except (DecodeError, ValueError, OSError) as e:  # its windows already embedded are never stored
            queue[:] = [q for q in queue if q.item is not item]
            report.reject(video.source, str(e) if isinstance(e, DecodeError) else f"failed: {type(e).__name__}: {e}")
            continue
        seen.add(video.source)
        done.append(item)
        if sum(len(p.starts) for p in done) >= indexer.batch_size:
            commit()
    if done:
        commit()
    with db:  # vanished (or now rejected) videos leave the index; this run's rejections replace the last
        for src, (vid, _) in known.items():
            if src not in seen:
                _delete_video(db, vid)
                counts["dropped"] += 1
        db.execute("DELETE FROM rejected WHERE root_id = ?", (root_id,))
        db.executemany("INSERT INTO rejected (root_id, source, reason) VALUES (?, ?, ?)",
                       [(root_id, r["source"], r["reason"]) for r in report.rejected])
    counts["rejected"] = report.rejected
    return counts


def finalize(db, folder: Path, approx_threshold: int = store.APPROX_THRESHOLD) -> dict:
    """Faiss files from the database, the build report, then (only then) state 'ready'."""
    faiss_info = store.write_faiss_files(db, folder, approx_threshold)
    accepted = [{"source": src, "root": root, "windows": n} for src, root, n in db.execute(
        "SELECT v.source, r.path, COUNT(w.id) FROM videos v JOIN roots r ON r.id = v.root_id "
        "LEFT JOIN windows w ON w.video_id = v.id GROUP BY v.id ORDER BY r.id, v.source")]
    rejected = [{"source": src, "root": root, "reason": reason} for src, root, reason in db.execute(
        "SELECT j.source, r.path, j.reason FROM rejected j JOIN roots r ON r.id = j.root_id ORDER BY r.id, j.source")]
    report = {"num_accepted": len(accepted), "num_rejected": len(rejected), "accepted": accepted, "rejected": rejected}
    store.atomic_write_json(folder / "build_report.json", report)
    with db:
        store.set_info(db, "faiss", faiss_info)
        store.set_info(db, "state", "ready")
    return report


def _run(db, folder: Path, model, model_path: str, source: str, settings: dict, batch_size: int,
         progress: bool, approx_threshold: int) -> dict:
    from ..evaluation.features import model_fingerprint
    with db:
        store.set_info(db, "model", {"name": model.name, "path": model_path, "fingerprint": model_fingerprint(model)})
        store.set_info(db, "settings", settings)
        store.set_info(db, "state", "building")
    indexer = Indexer(model, settings["window"], settings["stride"], settings["narrator"], batch_size)
    counts = sync_root(db, indexer, source, progress)
    report = finalize(db, folder, approx_threshold)
    total = db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
    return {"embedded_videos": counts["videos"], "embedded_windows": counts["windows"], "kept": counts["kept"],
            "dropped": counts["dropped"], "rejected": len(counts["rejected"]), "videos": report["num_accepted"],
            "windows": total, "index": str(folder)}


def check_input(source: str) -> None:
    if not (Path(source).exists() or any(c in source for c in "*?[{,")):
        raise MmvsslError(f"index input not found: {source} (a folder of videos, or shards)")


def build_index(model_dir: str, source: str, out: str, window: float | None = None, stride: float | None = None,
                narrator: str | None = None, batch_size: int = 16, progress: bool = False,
                approx_threshold: int = store.APPROX_THRESHOLD) -> dict:
    """Create (or resume, or bring up to date) the index `out` of `source` embedded by `model_dir`; one
    writer at a time (store.writer_lock: another `index build` / `index add` on it is refused)."""
    from ..models.presets import load_model
    check_input(source)
    model = load_model(model_dir)
    folder = Path(out)
    with store.writer_lock(folder):
        return _build_locked(folder, model, model_dir, source, window, stride, narrator, batch_size, progress,
                             approx_threshold)


def _build_locked(folder: Path, model, model_dir: str, source: str, window, stride, narrator, batch_size: int,
                  progress: bool, approx_threshold: int) -> dict:
    from ..evaluation.features import eval_spec, model_fingerprint
    db = store.connect(folder, create=True)
    try:
        store.check_model(db, folder, model_fingerprint(model), model.name, model_dir)
        window = float(window or eval_spec(model).window)
        settings = {"window": window, "stride": float(stride or window),
                    "narrator": str(Path(narrator).resolve()) if narrator else None}
        if settings["window"] <= 0 or settings["stride"] <= 0:
            raise MmvsslError(f"--window and --stride must be > 0 seconds, got {window} and {stride}")
        if narrator and not (Path(narrator) / "config.json").is_file():
            raise MmvsslError(f"not a narrator folder: {Path(narrator) / 'config.json'} is missing")
        old = store.get_info(db, "settings")
        if old and old != settings:
            diff = ", ".join(f"{k} {old.get(k)} (asked {v})" for k, v in settings.items() if old.get(k) != v)
            raise MmvsslError(f"index {folder} was built with other settings: {diff}; use `mmvssl index add` "
                              f"to add videos with its settings, or build into a new folder")
        return _run(db, folder, model, str(Path(model_dir).resolve()), source, settings, batch_size, progress,
                    approx_threshold)
    finally:
        db.close()


def add_to_index(index_dir: str, source: str, batch_size: int = 16, progress: bool = False,
                 approx_threshold: int = store.APPROX_THRESHOLD) -> dict:
    """Take the videos of `source` into an existing index, with the model and settings it records; one
    writer at a time (store.writer_lock)."""
    check_input(source)
    folder = Path(index_dir)
    store.connect(folder, readonly=True).close()  # an index, before anything is written into its folder
    with store.writer_lock(folder):
        return _add_locked(folder, source, batch_size, progress, approx_threshold)


def _add_locked(folder: Path, source: str, batch_size: int, progress: bool, approx_threshold: int) -> dict:
    from ..evaluation.features import model_fingerprint
    from ..models.presets import load_model
    db = store.connect(folder)
    try:
        info, settings = store.get_info(db, "model"), store.get_info(db, "settings")
        if not info or not settings:
            raise MmvsslError(f"index {folder} has no model recorded; build it with `mmvssl index build`")
        model = load_model(info["path"])
        store.check_model(db, folder, model_fingerprint(model), model.name, info["path"])
        return _run(db, folder, model, info["path"], source, settings, batch_size, progress, approx_threshold)
    finally:
        db.close()
