"""`mmvssl shards add-features`: the frozen image teacher's features of every video, computed
once at fixed frame times and written into new shards, so that training reads them
(`teacher.cached: true`) instead of running the teacher on every batch of every epoch.

For each sample of each input shard: frames at 0, 1/F, 2/F, ... seconds over the whole video
(F = `fps`), decoded with the loader's decoder (mmvssl.data.decode, centre-cropped to `size`),
normalised as the loader normalises a batch, and embedded by the teacher exactly as the online
path does (mmvssl.teacher.model: bf16 on GPU, fp32 on CPU), many frames of many samples per
teacher call. The output shard of the same name holds every member of the input sample copied
byte for byte plus `<key>.teacher.safetensors` (format: mmvssl/teacher/cache.py).

A sample whose video cannot be decoded is left out and reported by key with its reason; the
metadata-only records of video2dataset's failed downloads are copied as they are. Shards are
written under a temporary name and renamed when complete; `features_report.json` (teacher
fingerprint, settings, per-shard counts and skipped samples) and `sizes.json` are rewritten
after every shard, so a re-run skips the finished shards. A folder made with another teacher
or other settings is refused unless `overwrite`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.decode import DecodeError, decode_window, probe
from ..data.loader import frames_to_tensor
from ..data.rawsample import is_failed_download, metadata, video_member
from ..data.rewrite import OutputShard, ShardRewriter, shard_parts
from ..data.workshare import Share
from ..data.shardio import list_shards, shard_size
from ..errors import MmvsslError
from .cache import MEMBER, REPORT, cached_times, describe, encode_member, same_teacher

CHUNK_FRAMES = 256  # frames decoded per call: bounds the memory a long video takes


def parse_teacher_spec(spec: str) -> tuple[str, str, int]:
    """TEACHER_SPEC -> (arch, pretrained, image_size). Either `ARCH[:PRETRAINED]` (an open_clip name,
    `hf-hub:org/repo` or a model-config JSON; a tag or a checkpoint file) or an experiment config
    YAML, whose `teacher:` section is read (arch, pretrained, image_size)."""
    if spec.endswith((".yaml", ".yml")):
        from ..config import load_config
        t = load_config(spec).teacher
        if not t.arch:
            raise MmvsslError(f"{spec}: the config's teacher.arch is empty; it names no teacher")
        return t.arch, t.pretrained, int(t.image_size)
    head = "hf-hub:" if spec.startswith("hf-hub:") else ""
    arch, _, pretrained = spec[len(head):].partition(":")
    if not arch:
        raise MmvsslError(f"teacher '{spec}': expected ARCH[:PRETRAINED], e.g. ViT-B-32:openai")
    return head + arch, pretrained, 0


@dataclass
class _Pending:
    """A sample on its way: its frames go to the teacher in batches shared with other samples."""
    raw: dict
    times: torch.Tensor | None = None  # (N,) cached frame times; None: copied without features
    duration: float = 0.0
    features: list[torch.Tensor] = field(default_factory=list)  # (n, D) float16 per teacher call
    decoded: bool = False  # every frame queued
    failed: str | None = None

    @property
    def ready(self) -> bool:
        return self.failed is not None or self.times is None or (
            self.decoded and sum(len(f) for f in self.features) == len(self.times))


class _FeatureWriter:
    """Queues decoded frames, runs the teacher on full batches, writes samples in input order."""

    def __init__(self, teacher, identity: dict, fps: float, size: int, batch_size: int, shard: OutputShard,
                 progress):
        self.teacher, self.identity, self.fps, self.size = teacher, identity, fps, size
        self.batch_size, self.shard, self.progress = batch_size, shard, progress
        self.device = next(teacher.parameters()).device
        self.samples: list[_Pending] = []
        self.queue: list[tuple[_Pending, np.ndarray]] = []  # (owner, uint8 frames (n, S, S, 3))
        self.queued = 0

    def add(self, raw: dict) -> None:
        item = _Pending(raw)
        self.samples.append(item)
        chunks = self._decode(item)
        while True:  # the teacher runs between chunks (bounded memory), outside the sample's error handling
            try:
                frames = next(chunks, None)
            except (DecodeError, ValueError, KeyError) as e:
                self._fail(item, str(e) or type(e).__name__)
                break
            if frames is None:
                item.decoded = True
                break
            self.queue.append((item, frames))
            self.queued += len(frames)
            self._run_teacher(final=False)
        self._flush(final=False)

    def _decode(self, item: _Pending):
        """The sample's frames at the cached times, as uint8 (n, S, S, 3) chunks; DecodeError,
        ValueError or KeyError when the sample is broken."""
        raw, key = item.raw, item.raw["__key__"]
        ext, meta = video_member(raw), metadata(raw)
        if ext is None:
            if is_failed_download(raw):  # video2dataset's failed download: copy as is
                self.shard.count("without_video")
                return
            raise DecodeError(f"sample {key} has no video member")
        item.duration = float(meta.get("duration") or 0.0) or probe(raw[ext], check_decode=False).duration
        item.times = cached_times(item.duration, self.fps)
        for first in range(0, len(item.times), CHUNK_FRAMES):
            count = min(CHUNK_FRAMES, len(item.times) - first)
            yield decode_window(raw[ext], float(item.times[first]), count, self.fps, self.size, audio_rate=None).frames

    def _fail(self, item: _Pending, reason: str) -> None:
        item.failed = reason
        dropped = sum(len(f) for owner, f in self.queue if owner is item)
        self.queue = [(owner, f) for owner, f in self.queue if owner is not item]
        self.queued -= dropped

    def _run_teacher(self, final: bool) -> None:
        while self.queued >= self.batch_size or (final and self.queued):
            taken, n = [], 0
            while self.queue and n < self.batch_size:
                owner, frames = self.queue[0]
                k = min(len(frames), self.batch_size - n)
                taken.append((owner, frames[:k]))
                self.queue[0] = (owner, frames[k:])
                if k == len(frames):
                    self.queue.pop(0)
                n += k
            # the loader's normalisation, then the teacher's own conversion (as online): (1, 3, n, S, S)
            video = frames_to_tensor(np.concatenate([f for _, f in taken]))[None].to(self.device)
            features = self.teacher(video)["teacher_frames"][0].to("cpu", torch.float16)  # (n, D)
            offset = 0
            for owner, frames in taken:
                owner.features.append(features[offset:offset + len(frames)])
                offset += len(frames)
            self.queued -= n

    def _flush(self, final: bool) -> None:
        if final:
            self._run_teacher(final=True)
        while self.samples and self.samples[0].ready:
            self._write(self.samples.pop(0))

    def _write(self, item: _Pending) -> None:
        raw = item.raw
        self.progress.update(1)
        if item.failed is not None:
            self.shard.skip(raw, item.failed)
            return
        added = {}
        if item.times is not None:
            added[MEMBER] = encode_member(torch.cat(item.features), item.times, self.identity, self.fps, self.size,
                                          item.duration)
            self.shard.count("frames", len(item.times))
        self.shard.write(raw, added)

    def close(self) -> None:
        self._flush(final=True)


def _other_teacher(old: dict, new: dict) -> str | None:
    """Why features in a folder cannot be resumed by this run (None: they can)."""
    if same_teacher(old.get("teacher") or {}, new["teacher"]) and old.get("settings") == new["settings"]:
        return None
    return (f"holds features of teacher {describe(old.get('teacher') or {})} with {old.get('settings')}; this run "
            f"asks for {describe(new['teacher'])} with {new['settings']}")


def add_teacher_features(arch: str, pretrained: str, shards: str, out_dir: str | os.PathLike, fps: float = 4.0,
                         size: int = 0, image_size: int = 0, batch_size: int = 64, device: str | None = None,
                         overwrite: bool = False, progress: bool = True) -> dict:
    """Write shards with cached teacher features to `out_dir`; returns the features report
    ({teacher, settings, shards: {name: {source, samples, frames, without_video, skipped}}}) plus
    `done_before`, the shards a previous run had finished. `size` 0: decode frames straight at the
    teacher's image size (data.size reproduces the online path's frames exactly)."""
    from .model import load_teacher, teacher_identity
    urls = list_shards(shards)
    parts = list(shard_parts(urls))  # one output shard per input shard, of the same name
    if fps <= 0 or size < 0 or batch_size < 1:
        raise MmvsslError(f"need --fps > 0, --size >= 0 and --batch-size >= 1, got {fps}, {size}, {batch_size}")
    if not pretrained and not arch.startswith("hf-hub:"):
        raise MmvsslError(f"teacher '{arch}' has no weights: cached features of a randomly initialised teacher "
                          f"match no later run's teacher; name a tag or checkpoint (ARCH:PRETRAINED)")
    if Path(out_dir).resolve() in {Path(u).resolve().parent for u in urls}:
        raise MmvsslError(f"--out {out_dir} is the input shard folder: write the new shards elsewhere")
    share = Share.from_env()
    if device is None:  # under torchrun, each process of a node on its own GPU
        device = f"cuda:{share.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    teacher = load_teacher(arch, pretrained, image_size=image_size, device=device)
    identity = teacher_identity(arch, pretrained, image_size, teacher)
    settings = {"fps": float(fps), "size": int(size or teacher.image_size)}
    rewriter = ShardRewriter(out_dir, REPORT, {"teacher": identity, "settings": settings}, inputs=urls,
                             overwrite=overwrite, mismatch=_other_teacher, command="add-features",
                             counts=("frames", "without_video"), share=share)
    from tqdm import tqdm
    bar = tqdm(total=sum(shard_size(p.source) for p in rewriter.assigned(parts)),
               desc="add-features", unit="sample", file=sys.stderr, disable=not progress or not share.is_main)
    with bar:
        for context in rewriter.pending(parts):
            with context as shard:
                batcher = _FeatureWriter(teacher, identity, settings["fps"], settings["size"], batch_size, shard, bar)
                for raw in shard.part.samples():
                    batcher.add(raw)
                batcher.close()
    report = rewriter.finish()  # every process's shards, merged by rank 0
    return {**report, "done_before": sorted(set(rewriter.done_before) & {p.name for p in parts})}
