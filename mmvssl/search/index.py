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

Many processes (`torchrun --nproc_per_node N -m mmvssl.cli index build|add ...`, workshare.Share):
the input's units of work (a shard set's shards, a folder's videos) are split over the processes,
unit i to rank i % world. A batch of windows never spans two videos, so each window is embedded
in the same batch, of the same shape, whatever the split: the vectors equal one process's. Each
process turns its units into outcomes (per video: rejected, unchanged, or embedded with its windows'
vectors, thumbnails and narrations), one part file per unit written atomically into INDEX/.parts/.
SQLite has one writer (store.writer_lock, held by rank 0 from the start), so only rank 0 writes
the database: after every process is done it replays the parts in unit order, which is the order
one process scans the videos, with the same decisions (duplicates, unchanged hashes), so rows,
ids and vectors come out as one process writes them. A killed run keeps its finished parts; the
next run reuses those written for the same unit, model and settings and redoes the others.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from contextlib import ExitStack
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
from .. import fsio
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


def input_units(source: str) -> tuple[str, list[str]]:
    """The input's kind and its units of work, in scan order: a folder's videos (paths relative to
    it, sorted) or a shard set's shards."""
    if is_video_folder(source):
        return "folder", [entry["video"] for _, entry in read_entries(Path(source).resolve(), None, BuildReport())]
    return "shards", list_shards(source)


def scan_unit(source: str, kind: str, unit: str) -> Iterator[Video]:
    """The videos of one unit: a folder's video (a symlink that leaves the folder is rejected), or
    every sample of a shard."""
    if kind == "folder":
        root = Path(source).resolve()
        if inside(root, unit) is None:  # the one containment rule (shards build, datasets cut)
            yield Video(unit, None, error="symlink out of the collection")
            return
        try:
            yield Video(unit, (root / unit).read_bytes())
        except OSError as e:
            yield Video(unit, None, error=f"unreadable ({e.strerror or e})")
        return
    from ..data.shardio import absolute_url, tar_samples  # members over the size limit refused unread
    for sample in tar_samples([{"url": unit}], skip_unreadable_shard):
        ext = video_member(sample)
        key, url = sample["__key__"], absolute_url(sample["__url__"], resolve=True)
        if ext is None:  # none, or one over the size limit (refused unread)
            refused = sample.get(REFUSED)
            yield Video(key, None, error=refused.decode("utf-8", errors="replace") if refused else "no video member")
        else:
            yield Video(key, sample[ext], shard=url, member=f"{key}.{ext}")


def scan(source: str) -> Iterator[Video]:
    """The videos of a folder (sorted) or a shard set, as one process reads them."""
    kind, units = input_units(source)
    for unit in units:
        yield from scan_unit(source, kind, unit)


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

    def embed_video(self, video: Video, sha: str, replaces: int | None) -> Pending:
        """Every window of one video, embedded batch_size windows at a time. A batch never holds
        windows of two videos, so a window's vectors do not depend on which videos a process was
        given (module docstring)."""
        item = self.open(video, sha, replaces)
        for c in range(0, len(item.starts), self.batch_size):
            self.embed([self.decode(item, w) for w in range(c, min(c + self.batch_size, len(item.starts)))])
        return item

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


@dataclass
class Outcome:
    """What became of one input video: rejected (`error`; `unreadable` when its bytes could not be
    had, `duplicate` when its key came earlier), unchanged (only `sha256`: the index has these
    bytes), or embedded (`item`)."""
    source: str
    sha256: str | None = None
    error: str | None = None
    unreadable: bool = False
    duplicate: bool = False
    item: Pending | None = None


def outcomes(indexer: Indexer, videos, known: dict) -> Iterator[Outcome]:
    """Each video's outcome, embedding those whose bytes the index (`known`: source -> (id, sha256))
    does not hold. A key seen earlier in `videos` is not embedded again: whatever became of the
    earlier one, the replay (apply_outcomes) rejects the later one as a duplicate."""
    seen = set()
    for video in videos:
        if video.data is None:
            yield Outcome(video.source, error=video.error or "unreadable", unreadable=True)
            continue
        if video.source in seen:
            yield Outcome(video.source, duplicate=True)
            continue
        sha = hashlib.sha256(video.data).hexdigest()
        old_id, old_sha = known.get(video.source, (None, None))
        if old_sha == sha:
            seen.add(video.source)
            yield Outcome(video.source, sha)
            continue
        try:
            item = indexer.embed_video(video, sha, old_id)
        except (DecodeError, ValueError, OSError) as e:  # nothing of it is stored
            yield Outcome(video.source, sha, error=str(e) if isinstance(e, DecodeError) else
                          f"failed: {type(e).__name__}: {e}")
            continue
        seen.add(video.source)
        yield Outcome(video.source, sha, item=item)


def apply_outcomes(db, root_id: int, outcomes_in_order, batch_size: int, window: float) -> dict:
    """Write the outcomes, in the order one process scans the input, into the database: the
    decisions of a one-process build (a key twice: the later rejected; bytes the index holds: kept)
    taken against the database as it is now, embedded videos committed a batch at a time (one
    transaction: every video of it, or, killed, none); then vanished videos dropped and this run's
    rejections stored. Returns the counts."""
    known = known_videos(db, root_id)
    report, seen = BuildReport(), set()
    done: list[Pending] = []  # embedded videos, committed together
    counts = {"videos": 0, "windows": 0, "kept": 0, "dropped": 0}

    def commit():
        with db:
            store_batch(db, root_id, done, window)
        counts["videos"] += len(done)
        counts["windows"] += sum(len(p.starts) for p in done)
        done.clear()

    for o in outcomes_in_order:
        if o.unreadable:
            report.reject(o.source, o.error)
            continue
        if o.duplicate or o.source in seen:  # a key twice in a shard set
            report.reject(o.source, "duplicate of an earlier video with the same key")
            continue
        old_id, old_sha = known.get(o.source, (None, None))
        if old_sha is not None and old_sha == o.sha256:  # (an embedded outcome too, on a resumed replay)
            seen.add(o.source)
            counts["kept"] += 1
            continue
        if o.error is not None or o.item is None:
            report.reject(o.source, o.error or "changed since its part was written")
            continue
        seen.add(o.source)
        o.item.replaces = old_id
        done.append(o.item)
        if sum(len(p.starts) for p in done) >= batch_size:
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


def root_entry(db, source: str) -> int:
    """The id of the input's row in `roots` (made when new)."""
    kind = "folder" if is_video_folder(source) else "shards"
    db.execute("INSERT OR IGNORE INTO roots (path, kind) VALUES (?, ?)", (root_path(source), kind))
    root_id = db.execute("SELECT id FROM roots WHERE path = ?", (root_path(source),)).fetchone()[0]
    db.commit()
    return root_id


def root_path(source: str) -> str:
    return str(Path(source).resolve()) if is_video_folder(source) else source


def known_videos(db, root_id: int) -> dict:
    return {src: (vid, sha) for vid, src, sha in
            db.execute("SELECT id, source, sha256 FROM videos WHERE root_id = ?", (root_id,))}


def sync_root(db, indexer: Indexer, source: str, progress: bool = False) -> dict:
    """Bring one input (folder or shard set) up to date in the index, in this one process: videos
    embedded and committed as they come; returns its counts."""
    root_id = root_entry(db, source)
    videos = scan(source)
    if progress:
        from tqdm import tqdm
        videos = tqdm(videos, desc="index", unit="video", file=sys.stderr)
    return apply_outcomes(db, root_id, outcomes(indexer, videos, known_videos(db, root_id)), indexer.batch_size,
                          indexer.window)


# ---- many processes: per-unit part files, replayed by rank 0

PART_FORMAT = "mmvssl-index-part/1"
PARTS_NAME = ".parts"


def _unit_stamp(source: str, kind: str, unit: str) -> list[int] | None:
    """A local file's size and modification time, standing for its content (None: remote)."""
    path = Path(source).resolve() / unit if kind == "folder" else Path(unit)
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns]


def _write_part(path: Path, header: dict, outs: list[Outcome]) -> None:
    """Outcomes of one unit into a safetensors file: vectors and thumbnails as arrays, the rest as
    JSON in its metadata (no pickle); written atomically."""
    from safetensors.numpy import save
    records, arrays = [], {}
    for k, o in enumerate(outs):
        rec = {"source": o.source, "sha256": o.sha256, "error": o.error, "unreadable": o.unreadable,
               "duplicate": o.duplicate}
        if o.item is not None:
            it = o.item
            rec.update(shard=it.video.shard, member=it.video.member, duration=it.duration, starts=it.starts,
                       narrations=it.narrations, spaces=sorted(it.vectors))
            for w, thumb in enumerate(it.thumbs):
                if thumb is not None:
                    arrays[f"{k}/thumb/{w}"] = np.frombuffer(thumb, dtype=np.uint8)
            for space, per_window in it.vectors.items():
                dim = next(v for v in per_window if v is not None).shape[0]
                arrays[f"{k}/{space}"] = np.stack([v if v is not None else np.zeros(dim, np.float32)
                                                   for v in per_window])  # (W, D)
                arrays[f"{k}/{space}/has"] = np.array([v is not None for v in per_window], dtype=np.uint8)
        records.append(rec)
    fsio.atomic_write_bytes(path, save(arrays, metadata={"header": json.dumps(header),
                                                         "outcomes": json.dumps(records)}))


def _read_part(path: Path, header: dict, arrays: bool = True) -> list[Outcome] | None:
    """The outcomes in `path` if it was written for `header`, else None; without `arrays`, the
    embedded ones without their vectors and thumbnails. Our own file, read without unpickling."""
    from safetensors import SafetensorError, safe_open
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("header", "null")) != header:
                return None
            records = json.loads(meta["outcomes"])
            names = set(f.keys())
            outs = []
            for k, rec in enumerate(records):
                o = Outcome(rec["source"], rec["sha256"], rec["error"], rec["unreadable"], rec["duplicate"])
                if "starts" in rec:
                    n = len(rec["starts"])
                    thumbs = [f.get_tensor(f"{k}/thumb/{w}").tobytes() if arrays and f"{k}/thumb/{w}" in names
                              else None for w in range(n)]
                    vectors = {}
                    for space in rec["spaces"] if arrays else ():
                        vecs, has = f.get_tensor(f"{k}/{space}"), f.get_tensor(f"{k}/{space}/has")
                        vectors[space] = [vecs[w] if has[w] else None for w in range(n)]
                    narrations = [tuple(x) if x is not None else None for x in rec["narrations"]]
                    o.item = Pending(Video(rec["source"], None, rec["shard"], rec["member"]), rec["sha256"],
                                     rec["duration"], None, rec["starts"], thumbs, vectors, narrations)
                outs.append(o)
    except (OSError, KeyError, ValueError, TypeError, SafetensorError):
        return None
    return outs


def _finished(path: Path, header: dict, known: dict) -> bool:
    """Whether a part from a killed run can be used: written for this header, and each video it
    found unchanged still in the index with those bytes."""
    outs = _read_part(path, header, arrays=False)
    return outs is not None and all(o.item is not None or o.error is not None or o.duplicate or o.unreadable
                                    or known.get(o.source, (None, None))[1] == o.sha256 for o in outs)


def embed_units(indexer: Indexer, share, folder: Path, source: str, known: dict, header: dict,
                progress: bool = False) -> tuple[list[Path], list[dict]]:
    """The units without a finished part (from a killed run) dealt out over the processes (the
    j-th to rank j % world), this process's embedded into part files; returns every unit's part
    path and header, in unit order, for the replay."""
    kind, units = input_units(source)
    parts = folder / PARTS_NAME
    parts.mkdir(parents=True, exist_ok=True)
    paths = [parts / f"part-{i:06d}.safetensors" for i in range(len(units))]
    headers = [{**header, "unit": unit, "stamp": _unit_stamp(source, kind, unit)} for unit in units]
    finished = [_finished(path, h, known) for path, h in zip(paths, headers)]
    share.barrier()  # every process has seen the same finished parts before any writes one
    mine = share.mine([i for i in range(len(units)) if not finished[i]])
    if progress:
        from tqdm import tqdm
        mine = tqdm(mine, desc=f"index (process {share.rank} of {share.world})",
                    unit="shard" if kind == "shards" else "video", file=sys.stderr)
    for i in mine:
        _write_part(paths[i], headers[i], list(outcomes(indexer, scan_unit(source, kind, units[i]), known)))
    return paths, headers


def replayed_parts(paths: list[Path], headers: list[dict]) -> Iterator[Outcome]:
    """Every unit's outcomes, in unit order (rank 0, after every process finished)."""
    for path, header in zip(paths, headers):
        outs = _read_part(path, header)
        if outs is None:
            raise MmvsslError(f"{path}: the part of {header['unit']} is missing after every process finished "
                              f"(is the index folder on a file system all processes see?)")
        yield from outs


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


def _write_index(share, folder: Path, source: str, batch_size: int, progress: bool, approx_threshold: int,
                 prepare, model=None) -> dict | None:
    """Bring the index `folder` up to date with `source`, by the processes of `share`. Rank 0 holds
    the writer lock throughout and alone writes the database: `prepare(db)` checks the index against
    the model and settings and returns (model, model path, settings); a refusal there stops every
    process with the same line. One process embeds and commits as it scans (sync_root); several
    embed their units into parts that rank 0 then replays (module docstring). Returns the counts on
    rank 0, None on the others."""
    from ..evaluation.features import model_fingerprint
    with ExitStack() as stack:
        db, said, failure = None, {"error": None}, None
        if share.is_main:
            try:
                stack.enter_context(store.writer_lock(folder))
                db = store.connect(folder, create=True)
                stack.callback(db.close)
                model, model_path, settings = prepare(db)
                with db:
                    store.set_info(db, "model", {"name": model.name, "path": model_path,
                                                 "fingerprint": model_fingerprint(model)})
                    store.set_info(db, "settings", settings)
                    store.set_info(db, "state", "building")
                said = {"error": None, "model_path": model_path, "settings": settings,
                        "root_id": root_entry(db, source)}
            except MmvsslError as e:
                if share.world == 1:
                    raise
                said, failure = {"error": str(e)}, e
        said = share.gather_objects(said)[0]  # rank 0's word, on every process
        if said["error"] is not None:
            raise failure or MmvsslError(said["error"])
        settings, root_id = said["settings"], said["root_id"]
        if model is None:
            from ..models.presets import load_model
            model = load_model(said["model_path"])
        indexer = Indexer(model, settings["window"], settings["stride"], settings["narrator"], batch_size)
        if share.world == 1:
            counts = sync_root(db, indexer, source, progress)
        else:
            if share.is_main:
                known = known_videos(db, root_id)
            else:
                reader = store.connect(folder, readonly=True)
                known = known_videos(reader, root_id)
                reader.close()
            header = {"format": PART_FORMAT, "root": root_path(source), "model": model_fingerprint(model),
                      "settings": settings, "batch_size": batch_size}
            paths, headers = embed_units(indexer, share, folder, source, known, header, progress and share.is_main)
            share.gather_objects(None)  # every process done: every part written
            if not share.is_main:
                return None
            counts = apply_outcomes(db, root_id, replayed_parts(paths, headers), batch_size, settings["window"])
        report = finalize(db, folder, approx_threshold)
        shutil.rmtree(folder / PARTS_NAME, ignore_errors=True)
        total = db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
        return {"embedded_videos": counts["videos"], "embedded_windows": counts["windows"], "kept": counts["kept"],
                "dropped": counts["dropped"], "rejected": len(counts["rejected"]), "videos": report["num_accepted"],
                "windows": total, "index": str(folder)}


def check_input(source: str) -> None:
    if not (Path(source).exists() or any(c in source for c in "*?[{,")):
        raise MmvsslError(f"index input not found: {source} (a folder of videos, or shards)")


def build_index(model_dir: str, source: str, out: str, window: float | None = None, stride: float | None = None,
                narrator: str | None = None, batch_size: int = 16, progress: bool = False,
                approx_threshold: int = store.APPROX_THRESHOLD, share=None) -> dict | None:
    """Create (or resume, or bring up to date) the index `out` of `source` embedded by `model_dir`; one
    writer at a time (store.writer_lock: another `index build` / `index add` on it is refused). With
    `share` (workshare.Share), its processes share the embedding (module docstring); the counts come
    back on rank 0, None on the others."""
    from ..data.workshare import Share
    from ..evaluation.features import eval_spec, model_fingerprint
    from ..models.presets import load_model
    check_input(source)
    model = load_model(model_dir)
    folder = Path(out)

    def prepare(db):
        store.check_model(db, folder, model_fingerprint(model), model.name, model_dir)
        w = float(window or eval_spec(model).window)
        settings = {"window": w, "stride": float(stride or w),
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
        return model, str(Path(model_dir).resolve()), settings

    return _write_index(share or Share(), folder, source, batch_size, progress, approx_threshold, prepare, model)


def add_to_index(index_dir: str, source: str, batch_size: int = 16, progress: bool = False,
                 approx_threshold: int = store.APPROX_THRESHOLD, share=None) -> dict | None:
    """Take the videos of `source` into an existing index, with the model and settings it records; one
    writer at a time (store.writer_lock); several processes with `share`, as build_index."""
    from ..data.workshare import Share
    from ..evaluation.features import model_fingerprint
    from ..models.presets import load_model
    check_input(source)
    folder = Path(index_dir)
    store.connect(folder, readonly=True).close()  # an index, before anything is written into its folder

    def prepare(db):
        info, settings = store.get_info(db, "model"), store.get_info(db, "settings")
        if not info or not settings:
            raise MmvsslError(f"index {folder} has no model recorded; build it with `mmvssl index build`")
        model = load_model(info["path"])
        store.check_model(db, folder, model_fingerprint(model), model.name, info["path"])
        return model, info["path"], settings

    return _write_index(share or Share(), folder, source, batch_size, progress, approx_threshold, prepare)
