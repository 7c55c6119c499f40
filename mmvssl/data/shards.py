"""Build webdataset tar shards from a folder of videos and a captions file.

Layout (video2dataset-compatible, readable by plain `tar` and `webdataset`): per sample
`<key>.mp4` (the original bytes, or the re-encoded clip), `<key>.json` (metadata) and
`<key>.txt` (caption, when there is one). Beside the tars: `sizes.json` (samples per shard) and
`build_report.json` (every input accounted for: accepted with its key, rejected with the reason).

Inputs are probed (and optionally re-encoded) by a process pool; the main process writes shards
in input order, so the output does not depend on the number of workers. A shard is written under
a temporary name and renamed when complete, and the report records how far the build got after
every shard: re-running on the same folder resumes there (finished shards are kept, nothing is
written twice).

`--out s3://bucket/prefix` builds in a local staging folder and uploads each shard once it is
complete (one PUT per object: no half-written shard is ever visible), then sizes.json, then the
report; a re-run reads the report back from the bucket and resumes there (BucketOutput).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds

from ..errors import MmvsslError
from ..fsio import atomic_write_json, commit_file, inside, outside_reason
from .decode import DecodeError, check_video_stream, probe
from .rawsample import metadata_problem
from . import remote
from .shardio import MemberLimits
from .transcode import TranscodeOptions, transcode

MEDIA_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"}


@dataclass
class BuildReport:
    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def reject(self, source: str, reason: str, line: int | None = None) -> None:
        item = {"source": source, "reason": reason}
        if line is not None:
            item["line"] = line
        self.rejected.append(item)

    def to_dict(self) -> dict:
        return {"num_accepted": len(self.accepted), "num_rejected": len(self.rejected),
                "accepted": self.accepted, "rejected": self.rejected}


def read_entries(videos_dir: Path, captions: Path | None, report: BuildReport) -> list[tuple[int | None, dict]]:
    """(line number, entry) pairs; malformed lines go straight to the report."""
    if captions is None:
        files = sorted(p for p in videos_dir.rglob("*") if p.suffix.lower() in MEDIA_SUFFIXES and p.is_file())
        return [(None, {"video": str(p.relative_to(videos_dir))}) for p in files]
    if not captions.is_file():
        raise MmvsslError(f"captions file not found: {captions}")
    entries = []
    if captions.suffix.lower() == ".csv":
        with open(captions, newline="") as f:
            for line_no, row in enumerate(csv.DictReader(f), start=2):
                entry = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
                if isinstance(entry.get("narrations"), str):
                    try:
                        entry["narrations"] = json.loads(entry["narrations"])
                    except json.JSONDecodeError:
                        report.reject(f"{captions}:{line_no}", "narrations column is not valid JSON", line_no)
                        continue
                entries.append((line_no, entry))
    else:
        with open(captions, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    report.reject(f"{captions}:{line_no}", f"malformed JSON ({e.msg})", line_no)
                    continue
                entries.append((line_no, entry))
    valid = []
    for line_no, entry in entries:
        where = f"{captions}:{line_no}"
        problem = metadata_problem(entry) if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("video"), str) or not entry["video"]:
            report.reject(where, "entry has no 'video' path", line_no)
        elif problem:  # the same check every reader of the shards applies (rawsample.metadata_problem)
            report.reject(where, problem, line_no)
        else:
            valid.append((line_no, entry))
    return valid


@dataclass
class Limits:
    """Inputs past these are rejected from the container header, before anything is decoded."""
    max_pixels: int = 4096 * 2160
    max_seconds: float = 4 * 3600.0
    check: str = "full"  # "full": decode every video packet (finds truncation); "first-frame": faster
    max_member_mb: float = MemberLimits.max_member_mb  # larger files would be refused by every shard reader


@dataclass
class Job:
    index: int
    line: int | None
    source: str
    path: str
    entry: dict


def ingest_one(job: Job, limits: Limits, options: TranscodeOptions) -> tuple[str, object]:
    """("ok", [(key, ext, bytes, meta), ...]) or ("rejected", reason). Runs in a worker process."""
    path = Path(job.path)
    try:
        if not path.is_file():
            raise DecodeError("file not found")
        size = path.stat().st_size
        if size == 0:
            raise DecodeError("empty file (0 bytes)")
        if size > limits.max_member_mb * 2**20:
            raise DecodeError(f"file of {size / 2**20:.1f} MiB, over max_member_mb={limits.max_member_mb:g} "
                              f"(--max-member-mb; shard readers refuse larger members)")
        data = path.read_bytes()
        info = probe(data, max_pixels=limits.max_pixels, max_seconds=limits.max_seconds)
        if limits.check == "full":
            check_video_stream(data, info.duration)
        user = {k: v for k, v in job.entry.items() if k != "video"}
        key = f"{job.index:09d}"
        if not options.active:
            return "ok", [(key, path.suffix.lower().lstrip(".") or "mp4", data,
                           {**user, "source": job.source, **info.to_dict()})]
        clips = transcode(data, options, info.duration)
        samples = []
        for c, clip in enumerate(clips):
            meta = {**user, "source": job.source, **probe(clip.data, check_decode=True).to_dict(),
                    "source_duration": info.duration, "source_rotation": info.rotation}
            if len(clips) > 1 or options.max_seconds:
                meta.update(clip_index=c, clip_start=clip.start, clip_end=clip.end)
                if isinstance(user.get("narrations"), list):
                    meta["narrations"] = retime_narrations(user["narrations"], clip.start, clip.end)
            samples.append((key if len(clips) == 1 else f"{key}_{c:03d}", "mp4", clip.data, meta))
        return "ok", samples
    except DecodeError as e:
        return "rejected", str(e)
    except OSError as e:
        return "rejected", f"unreadable ({e.strerror or e})"
    except MemoryError:
        return "rejected", "out of memory while decoding"
    except Exception as e:  # noqa: BLE001 - one bad input must never stop the build
        return "rejected", f"failed: {type(e).__name__}: {str(e)[:200]}"


def retime_narrations(narrations: list[dict], start: float, end: float) -> list[dict]:
    """Narrations overlapping [start, end), shifted to the clip's time and clipped to it."""
    out = []
    for n in narrations:
        s, e = float(n["start"]), float(n["end"])
        if e > start and s < end or (s == e and start <= s < end):
            out.append({**n, "start": round(max(s, start) - start, 3), "end": round(min(e, end) - start, 3)})
    return out


def _ingest_star(args):
    return ingest_one(*args)


class ShardWriter:
    """Numbered shards written under a temporary name and renamed when complete."""

    def __init__(self, out_dir: Path, samples_per_shard: int, sizes: dict[str, int]):
        self.out_dir, self.per_shard, self.sizes = out_dir, samples_per_shard, sizes
        self.writer, self.name = None, None

    @property
    def full(self) -> bool:
        return self.writer is not None and self.sizes[self.name] >= self.per_shard

    def write(self, sample: dict) -> str:
        if self.writer is None:
            self.name = f"shard-{len(self.sizes):06d}.tar"
            self.sizes[self.name] = 0
            self.writer = wds.TarWriter(str(self.out_dir / (self.name + ".partial")))
        self.writer.write(sample)
        self.sizes[self.name] += 1
        return self.name

    def close(self) -> bool:
        if self.writer is None:
            return False
        self.writer.close()
        commit_file(self.out_dir / (self.name + ".partial"), self.out_dir / self.name)
        self.writer = None
        return True


def _fingerprint(entries, samples_per_shard, limits, options) -> str:
    text = json.dumps([entries, samples_per_shard, asdict(limits), asdict(options)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _prepare_output(out_dir: Path, fingerprint: str, overwrite: bool) -> dict | None:
    """The saved progress of an earlier build of the same inputs (None: start afresh)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "build_report.json"
    ours = [*out_dir.glob("shard-*.tar"), *out_dir.glob("shard-*.tar.partial"), out_dir / "sizes.json", report_path]
    state = None
    if not overwrite and report_path.is_file():
        try:
            state = json.loads(report_path.read_text()).get("progress")
        except (json.JSONDecodeError, AttributeError):
            state = None
        if state is None or state.get("fingerprint") != fingerprint:
            raise MmvsslError(f"{out_dir} holds shards built from other inputs or options; pass --overwrite "
                              f"(overwrite=True) to rebuild them, or choose another folder")
    elif not overwrite and any(p.is_file() for p in ours[:-2]):
        raise MmvsslError(f"{out_dir} holds shard files without a build_report.json; pass --overwrite "
                          f"(overwrite=True) to replace them, or choose another folder")
    keep = set(state["sizes"]) if state else set()
    for old in ours:  # our own files only; anything else in the folder is left alone
        if old.name not in keep and old != report_path:
            old.unlink(missing_ok=True)
    return state


class BucketOutput(remote.Staging):
    """A remote `--out`: the staging folder the build writes into, published after every shard.
    Ours in the bucket are shard-*.tar, sizes.json and build_report.json; the report goes last."""

    def __init__(self, url: str, overwrite: bool):
        super().__init__(url)
        ours = sorted(n for n in self.names if (n.startswith("shard-") and n.endswith(".tar"))
                      or n in ("sizes.json", "build_report.json"))
        if overwrite:
            for name in ours:
                self.remove(name)
        elif not self.fetch("build_report.json") and ours:
            raise MmvsslError(f"{self.url} holds shard files without a build_report.json; pass --overwrite "
                              f"(overwrite=True) to replace them, or choose another prefix")

    def publish(self, sizes: dict) -> None:
        super().publish(list(sizes), "sizes.json", "build_report.json")


def build_shards(videos_dir: str | os.PathLike, out_dir: str | os.PathLike, captions: str | os.PathLike | None = None,
                 samples_per_shard: int = 256, max_pixels: int = 4096 * 2160, max_seconds: float = 4 * 3600.0,
                 progress: bool = False, workers: int = 1, short_side: int | None = None, fps: float | None = None,
                 clip_seconds: float | None = None, overwrite: bool = False, check: str = "full",
                 max_member_mb: float = MemberLimits.max_member_mb) -> dict:
    """Probe (and optionally re-encode) every listed video, write the good ones into shards,
    report every input. Re-running on the same `out_dir` resumes; `overwrite` rebuilds. A `video`
    path that leads outside `videos_dir` (absolute elsewhere, `..`, a symlink out) is rejected
    (fsio.inside, the rule `index build` and `datasets cut` apply too)."""
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise MmvsslError(f"videos folder not found: {videos_dir}")
    bucket = BucketOutput(str(out_dir), overwrite) if remote.is_remote(out_dir) else None
    out_dir = bucket.folder if bucket else Path(out_dir)
    try:
        return _build(videos_dir, out_dir, captions, samples_per_shard, max_pixels, max_seconds, progress, workers,
                      short_side, fps, clip_seconds, overwrite, check, max_member_mb, bucket)
    finally:
        if bucket:
            bucket.close()


def _build(videos_dir, out_dir, captions, samples_per_shard, max_pixels, max_seconds, progress, workers,
           short_side, fps, clip_seconds, overwrite, check, max_member_mb, bucket) -> dict:
    if check not in ("full", "first-frame"):
        raise MmvsslError(f"check must be 'full' or 'first-frame', got '{check}'")
    limits = Limits(max_pixels, max_seconds, check, max_member_mb)
    options = TranscodeOptions(short_side, fps, clip_seconds)
    report = BuildReport()
    entries = read_entries(videos_dir, Path(captions) if captions else None, report)
    fingerprint = _fingerprint(entries, samples_per_shard, limits, options)
    state = _prepare_output(out_dir, fingerprint, overwrite)
    sizes: dict[str, int] = dict(state["sizes"]) if state else {}
    start = state["next_input"] if state else 0
    if state:
        report.accepted, report.rejected = state["accepted"], report.rejected + state["rejected"]

    jobs, seen = [], {}
    for index, (line_no, entry) in enumerate(entries):
        contained = inside(videos_dir, entry["video"])
        if contained is None:
            if index >= start:
                report.reject(entry["video"], f"refused, {outside_reason(videos_dir, entry['video'])}", line_no)
                report.rejected[-1]["_input"] = index
            continue
        resolved = str(contained)
        if resolved in seen:
            if index >= start:
                report.reject(entry["video"], f"duplicate entry of line {seen[resolved]}", line_no)
                report.rejected[-1]["_input"] = index
            continue
        seen[resolved] = line_no
        if index >= start:
            jobs.append(Job(index, line_no, entry["video"], str(videos_dir / entry["video"]), entry))

    def save(next_input: int, complete: bool) -> dict:
        """The report, with the progress a resumed build starts from (rejections of inputs
        carry their input index there; malformed lines are found again on every run)."""
        result = report.to_dict()
        result["rejected"] = [{k: v for k, v in r.items() if k != "_input"} for r in report.rejected]
        result["progress"] = {"fingerprint": fingerprint, "next_input": next_input, "complete": complete,
                              "sizes": dict(sizes), "accepted": report.accepted,
                              "rejected": [r for r in report.rejected if r.get("_input", next_input) < next_input]}
        for name, value in (("sizes.json", sizes), ("build_report.json", result)):
            atomic_write_json(out_dir / name, value)  # temp file, fsync, rename, fsync the folder
        if bucket:
            bucket.publish(sizes)
        return result

    shard = ShardWriter(out_dir, samples_per_shard, {k: v for k, v in sizes.items()})
    sizes = shard.sizes
    results = _run(jobs, limits, options, workers)
    if progress:
        from tqdm import tqdm
        results = tqdm(results, total=len(jobs), desc="shards build", unit="video")
    for job, (status, value) in zip(jobs, results):
        if shard.full:
            shard.close()
            save(job.index, complete=False)
        if status == "rejected":
            report.reject(job.source, value, job.line)
            report.rejected[-1]["_input"] = job.index
            continue
        keys, names = [], []
        for key, ext, data, meta in value:
            member = {"__key__": key, ext: data, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
            if isinstance(job.entry.get("caption"), str):
                member["txt"] = job.entry["caption"].encode("utf-8")
            names.append(shard.write(member))
            keys.append(key)
        item = {"source": job.source, "key": keys[0], "shard": names[0]}
        if len(keys) > 1:
            item["clips"] = [{"key": k, "shard": n} for k, n in zip(keys, names)]
        report.accepted.append(item)
    shard.close()
    return save(len(entries), complete=True)


def _run(jobs: list[Job], limits: Limits, options: TranscodeOptions, workers: int):
    """Results in input order; a process pool when workers > 1."""
    if workers <= 1 or len(jobs) <= 1:
        return (ingest_one(job, limits, options) for job in jobs)
    pool = ProcessPoolExecutor(max_workers=workers)

    def ordered():
        try:
            yield from pool.map(_ingest_star, [(job, limits, options) for job in jobs], chunksize=1)
        finally:
            pool.shutdown(cancel_futures=True)
    return ordered()
