"""The webdataset pipeline: tar shards -> decoded samples -> batches (the Batch contract).

Shards are read member by member as raw bytes; nothing is unpickled (we never call
webdataset's default `.decode()`, which would unpickle `.pyd` members). Training streams
resampled shards forever (seeded per process and worker); evaluation reads every sample once,
split over processes and workers. A sample that fails to decode is skipped and counted, and
the count travels with the next batch so it reaches the training log.
"""

from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand

from ..errors import MmvsslError
from .decode import DecodeError, decode_window
from .sampling import center_window, random_window, select_texts
from .text import build_tokenizer

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
VIDEO_MEAN = torch.tensor([0.45, 0.45, 0.45]).view(3, 1, 1, 1)
VIDEO_STD = torch.tensor([0.225, 0.225, 0.225]).view(3, 1, 1, 1)


def list_shards(spec: str) -> list[str]:
    """A folder (its *.tar), a brace pattern, a glob, or several of those joined by ','."""
    urls: list[str] = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise MmvsslError(f"no .tar shards in folder {part}")
            urls.extend(found)
            continue
        for item in braceexpand(part):
            matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
            for m in matches:
                if not os.path.isfile(m):
                    raise MmvsslError(f"shard not found: {m}")
                urls.append(m)
    if not urls:
        raise MmvsslError(f"no shards found for '{spec}'")
    return urls


@dataclass
class SampleSpec:
    """How one sample becomes tensors."""
    num_frames: int = 8
    fps: float = 4.0
    size: int = 64
    audio_rate: int = 16000
    context_length: int = 32
    num_candidates: int = 2
    train: bool = True
    seed: int = 0

    @property
    def window(self) -> float:
        return self.num_frames / self.fps

    @property
    def audio_samples(self) -> int:
        return int(round(self.window * self.audio_rate))


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float, normalised."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(255.0)
    return (x - VIDEO_MEAN) / VIDEO_STD


class DecodeSamples:
    """Pipeline stage: raw tar samples -> decoded samples; failures are skipped and counted."""

    def __init__(self, spec: SampleSpec, max_error_rate: float = 1.0, position: "StreamPosition | None" = None,
                 min_samples_for_rate: int = 50):
        self.spec = spec
        self.position = position or StreamPosition()
        self.tokenizer = build_tokenizer("clip-bpe", spec.context_length)
        self.max_error_rate = max_error_rate
        self.min_samples_for_rate = min_samples_for_rate

    def __call__(self, src):
        rank, slot = self.position.slot()
        seen = failed = pending = 0
        bad_shards: dict[str, int] = {}
        for index, raw in enumerate(src):
            seen += 1
            # one generator per sample, derived from its place in this worker's stream, so a
            # resumed stream that skips samples draws the same windows as an uninterrupted one
            rng = random.Random(f"{self.spec.seed}/{rank}/{slot}/{raw.get('__index__', index)}")
            try:
                sample = self.decode(raw, rng)
            except (DecodeError, ValueError, KeyError, json.JSONDecodeError) as e:
                failed += 1
                pending += 1
                url = raw.get("__url__", "?")
                bad_shards[url] = bad_shards.get(url, 0) + 1
                if seen >= self.min_samples_for_rate and failed / seen > self.max_error_rate:
                    worst = ", ".join(sorted(bad_shards, key=bad_shards.get, reverse=True)[:3])
                    raise MmvsslError(f"{failed} of {seen} samples failed to decode (limit "
                                      f"{self.max_error_rate:.0%}); worst shards: {worst}; last error: {e}")
                continue
            sample["_failed"], pending = pending, 0  # failures since the previous yielded sample
            yield sample

    def decode(self, raw: dict, rng: random.Random) -> dict:
        spec = self.spec
        key = raw.get("__key__", "?")
        ext = next((e for e in VIDEO_EXTENSIONS if e in raw), None)
        if ext is None:
            raise DecodeError(f"sample {key} has no video member")
        meta = json.loads(raw["json"]) if "json" in raw else {}
        if "txt" in raw and not meta.get("caption"):
            meta["caption"] = raw["txt"].decode("utf-8", errors="replace").strip()
        duration = float(meta.get("duration") or 0.0)
        if duration <= 0:
            from .decode import probe
            duration = probe(raw[ext], check_decode=False).duration
        start = random_window(duration, spec.window, rng) if spec.train else center_window(duration, spec.window)
        clip = decode_window(raw[ext], start, spec.num_frames, spec.fps, spec.size, spec.audio_rate)
        texts = select_texts(meta, clip.start, clip.end, spec.num_candidates)
        k = spec.num_candidates
        tokens = torch.zeros(k, spec.context_length, dtype=torch.long)
        text_mask = torch.zeros(k, dtype=torch.bool)
        if texts:
            tokens[:len(texts)] = self.tokenizer(texts)
            text_mask[:len(texts)] = True
        has_audio = clip.audio is not None
        audio = torch.from_numpy(clip.audio) if has_audio else torch.zeros(spec.audio_samples)
        return {
            "video": frames_to_tensor(clip.frames), "audio": audio, "text": tokens, "text_mask": text_mask,
            "has_video": True, "has_audio": has_audio, "has_text": bool(texts),
            "key": key, "meta": {**meta, "window": [clip.start, clip.end], "source_shard": raw.get("__url__")},
        }


def collate(samples: list[dict]) -> dict:
    batch = {
        "video": torch.stack([s["video"] for s in samples]),  # (B, C, T, H, W)
        "audio": torch.stack([s["audio"] for s in samples]),  # (B, S)
        "text": torch.stack([s["text"] for s in samples]),  # (B, K, L)
        "text_mask": torch.stack([s["text_mask"] for s in samples]),  # (B, K)
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "failed": torch.tensor(sum(s["_failed"] for s in samples)),  # samples skipped on the way
    }
    for m in ("video", "audio", "text"):
        batch[f"has_{m}"] = torch.tensor([s[f"has_{m}"] for s in samples], dtype=torch.bool)
    return batch


class StreamPosition:
    """Where this worker's stream stands, so that a resumed run sees the same batches.

    DataLoader takes batch i from worker i % W. A loader resumed after N batches takes its batch
    k from worker k % W, which must produce original batch N + k: so worker w plays the `slot`
    (w + N) % W of the original run (its shard seed, its window draws) and skips, undecoded,
    the raw samples that slot had already turned into batches. Exact when none of those failed.
    """

    def __init__(self, start_batch: int = 0, batch_size: int = 1, num_workers: int = 0):
        self.start_batch, self.batch_size, self.num_workers = start_batch, batch_size, max(1, num_workers)

    def slot(self) -> tuple[int, int]:
        """(rank, slot) of the calling worker."""
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        return rank, (worker + self.start_batch) % self.num_workers

    def shard_seed(self) -> int:
        rank, slot = self.slot()
        return rank * 1000 + slot

    def __call__(self, src):
        """Pipeline stage: number the raw samples of the stream and drop the consumed ones."""
        _, slot = self.slot()
        to_skip = len(range(slot, self.start_batch, self.num_workers)) * self.batch_size
        for index, raw in enumerate(src):
            if index >= to_skip:
                raw["__index__"] = index
                yield raw


def build_dataset(shards: str, spec: SampleSpec, batch_size: int, shuffle_buffer: int = 256,
                  max_error_rate: float = 0.1, start_batch: int = 0, num_workers: int = 0) -> wds.DataPipeline:
    urls = list_shards(shards)
    position = StreamPosition(start_batch, batch_size, num_workers)
    if spec.train:
        stages = [wds.ResampledShards(urls, seed=spec.seed, deterministic=True, worker_seed=position.shard_seed),
                  wds.tarfile_to_samples(handler=wds.warn_and_continue),
                  wds.detshuffle(shuffle_buffer, initial=min(shuffle_buffer, 64), seed=spec.seed),
                  position]
    else:
        stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
                  wds.tarfile_to_samples(handler=wds.warn_and_continue)]
    stages += [DecodeSamples(spec, max_error_rate, position),
               wds.batched(batch_size, collation_fn=collate, partial=not spec.train)]
    return wds.DataPipeline(*stages)


def build_loader(shards: str, spec: SampleSpec, batch_size: int, num_workers: int = 0,
                 shuffle_buffer: int = 256, max_error_rate: float = 0.1,
                 start_batch: int = 0) -> torch.utils.data.DataLoader:
    """Batches per the Batch contract. Training: an endless seeded stream; `start_batch=N` resumes
    it after N consumed batches. Evaluation: every sample once, split over processes and workers."""
    dataset = build_dataset(shards, spec, batch_size, shuffle_buffer, max_error_rate, start_batch, num_workers)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None)
