"""`mmvssl shards add-flow`: dense optical flow of every video, computed once on the CPU with
OpenCV and written into new shards (format and pairing: mmvssl/data/flow.py), so that training
reads it instead of computing it on every batch. Each cached field is the flow from the frame shown
at a cached time to the source frame decoded right after it (consecutive frames of the video, as
the papers' TV-L1 / RAFT flow), not the flow between two cached times.

The shards go through the shard rewriter (mmvssl/data/rewrite.py): every member of a sample is
copied byte for byte beside `<key>.flow.safetensors`, one output shard per input shard of the
same name, each atomic; `flow_report.json` (settings, per shard the samples, frames, failed
downloads copied as they are, and the samples skipped with their reason) and `sizes.json` are
rewritten after every shard, so a re-run resumes; a folder made with other settings is refused
unless `overwrite`, and so is one made by an older format (flow.OLD_FORMATS), with one line saying
what it holds. A sample whose video cannot be decoded is left out and reported on one line
with its shard, key and reason.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import MmvsslError
from .cachetimes import cached_times
from .decode import DecodeError, decode_window, probe
from .flow import FORMAT, MEMBER, OLD_FORMATS, REPORT, FlowComputer, encode_member, quantise
from .rawsample import is_failed_download, metadata, video_bytes
from .rewrite import OutputShard, ShardRewriter, shard_parts
from .shardio import list_shards, shard_size

CHUNK_FRAMES = 128  # frames decoded per call: bounds the memory a long video takes


def sample_flow(data: bytes, duration: float, algorithm: str, fps: float, size: int) -> tuple[np.ndarray, object]:
    """(flow (N, H, W, 2) float32, times (N,)) of one video: flow[i] from the frame shown at times[i]
    to the source frame decoded right after it (0 for the last frame of the stream)."""
    times = cached_times(duration, fps)
    computer, rows = FlowComputer(algorithm), []
    for first in range(0, len(times), CHUNK_FRAMES):
        count = min(CHUNK_FRAMES, len(times) - first)
        clip = decode_window(data, float(times[first]), count, fps, None, audio_rate=None, short_side=size,
                             next_frames=True)
        rows.append(computer.pairs(clip.frames, clip.next_frames))  # row i: frame at times[i] -> its successor
    return np.concatenate(rows), times


def _add_one(raw: dict, shard: OutputShard, settings: dict) -> None:
    if is_failed_download(raw):  # video2dataset's record of a failed download: copied as it is
        shard.count("without_video")
        shard.write(raw)
        return
    meta = metadata(raw)
    data = video_bytes(raw)
    duration = float(meta.get("duration") or 0.0) or probe(data, check_decode=False).duration
    flow, times = sample_flow(data, duration, settings["algorithm"], settings["fps"], settings["size"])
    q, scale = quantise(flow, settings["clip"])
    member = encode_member(q, scale, times, settings["algorithm"], settings["fps"], settings["size"],
                           settings["clip"], duration)
    shard.write(raw, {MEMBER: member})
    shard.count("frames", len(times))


def _report_mismatch(old: dict, new: dict) -> str | None:
    """Why an earlier run's report (its header keys) cannot be resumed by this run, or None."""
    fmt = old.get("format") or "mmvssl-flow/1"  # reports of format 1 named no format
    if fmt != new["format"]:
        what = OLD_FORMATS.get(fmt, "a format this mmvssl does not read")
        return f"holds flow cached in the format {fmt} ({what}), not {new['format']}"
    if old.get("settings") != new["settings"]:
        return f"was written with {json.dumps(old.get('settings'))}; this run asks for {json.dumps(new['settings'])}"
    return None


def add_flow(shards: str, out_dir: str | os.PathLike, algorithm: str = "dis", fps: float = 8.0, size: int = 128,
             clip: float = 20.0, overwrite: bool = False, progress: bool = True) -> dict:
    """Write shards with cached optical flow to `out_dir`; returns the flow report ({format, settings,
    shards: {name: {source, samples, frames, without_video, skipped}}}) plus `done_before`."""
    from .flow import ALGORITHMS
    if algorithm not in ALGORITHMS:
        raise MmvsslError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got '{algorithm}'")
    if fps <= 0 or size < 8 or clip <= 0:
        raise MmvsslError(f"need --fps > 0, --size >= 8 and --clip > 0, got {fps}, {size}, {clip}")
    urls = list_shards(shards)
    parts = list(shard_parts(urls))
    if Path(out_dir).resolve() in {Path(u).resolve().parent for u in urls}:
        raise MmvsslError(f"--out {out_dir} is the input shard folder: write the new shards elsewhere")
    settings = {"algorithm": algorithm, "fps": float(fps), "size": int(size), "clip": float(clip)}
    rewriter = ShardRewriter(out_dir, REPORT, {"format": FORMAT, "settings": settings}, inputs=urls,
                             overwrite=overwrite, mismatch=_report_mismatch, command="add-flow",
                             counts=("frames", "without_video"))
    from tqdm import tqdm
    bar = tqdm(total=sum(shard_size(p.source) for p in rewriter.assigned(parts)),
               desc="add-flow", unit="sample", file=sys.stderr, disable=not progress or not rewriter.share.is_main)
    with bar:
        for context in rewriter.pending(parts):
            with context as shard:
                for raw in shard.part.samples():
                    bar.update(1)
                    try:
                        _add_one(raw, shard, settings)
                    except (DecodeError, ValueError, KeyError) as e:
                        reason = str(e) or type(e).__name__
                        shard.skip(raw, reason)
                        print(f"add-flow: skipped {shard.part.name} {raw['__key__']}: {reason}", file=sys.stderr)
    report = rewriter.finish()  # every process's shards, merged by rank 0
    return {**report, "done_before": sorted(set(rewriter.done_before) & {p.name for p in parts})}
