"""The webdataset pipeline: tar shards -> decoded samples -> batches (the Batch contract).

Shards are read member by member as raw bytes; nothing is unpickled (we never call
webdataset's default `.decode()`, which would unpickle `.pyd` members). Two modes:
"resampled" streams shards forever (seeded per process and worker; `epoch_length` cuts it into
fixed epochs; several shard sets are mixed by weight) and "epoch" reads every sample exactly
once over all processes and workers (mmvssl.data.shardio). A sample that fails to decode is
skipped and counted, and the count travels with the next batch so it reaches the training log;
video2dataset's failed downloads (metadata, no video) are skipped without counting as errors.
With `SampleSpec.teacher_features` each sample also carries the cached teacher features of its
frame times (mmvssl.teacher.cache); missing or foreign features stop the stream with an
error naming the shard and key, never a silent skip.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds

from ..errors import MmvsslError
from ..modalities import MODALITIES, VIEW_KEYS, group_key, is_group, presence_key
from .augment import Augmenter, AugmentOptions
from .decode import DecodeError, decode_window, probe
from .elastic import ElasticEpoch, EpochRecord
from .flow import pair_flow
from .rawsample import is_failed_download, metadata, video_bytes
from .labels import select_labelled
from .sampling import frame_times, select_source_texts, view_windows
from .shardio import (VIDEO_EXTENSIONS, EpochSamples, MemberLimits, list_shards, mix, parse_sources,
                      skip_unreadable_shard, tag_source, tar_stage)
from ..teacher.cache import pair_cached_frames
from .text import build_tokenizer

__all__ = ["SampleSpec", "build_loader", "build_dataset", "collate", "list_shards", "VIDEO_EXTENSIONS"]
VIDEO_MEAN = torch.tensor([0.45, 0.45, 0.45]).view(3, 1, 1, 1)
VIDEO_STD = torch.tensor([0.225, 0.225, 0.225]).view(3, 1, 1, 1)


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
    sampler: str = "random"  # random (center when not training), uniform, same, cvrl, overlap, concur, carl, teg, svt:
    # see sampling.view_windows
    num_clips: int = 1  # uniform: clips per video
    long_scale: float = 2.0  # teg/svt: the long clip is this many times num_frames / fps; carl: the longest crop
    num_global: int = 2  # svt
    num_local: int = 2  # svt
    # svt: local views are `local_frames` frames of `local_size` px (0: as the global views), cropped
    # with `augment.local_crop_scale`; they travel as the view group `video/local`
    local_size: int = 0
    local_frames: int = 0
    text_sources: tuple[str, ...] = ("human",)  # human, paraphrase, pseudo: one drawn per sample (LaViLa)
    # the keys of the labelled samples, set by a label-using method (mmvssl.data.labels.labelled_keys);
    # with labelled_share > 0 that share of the resampled stream is drawn from them
    labelled_keys: frozenset | None = None
    labelled_share: float = 0.0
    augment: AugmentOptions = field(default_factory=AugmentOptions)
    # the teacher fingerprint (mmvssl.teacher.model.teacher_identity) whose cached features each sample
    # must carry: they become `teacher_frames` for the first view's frame times; None: not read
    teacher_features: dict | None = None
    # cached optical flow (`shards add-flow`): `flow` ([V,] 2, T, H, W) float32 for `video`'s views,
    # paired with their frame times and cropped / flipped with them (mmvssl/data/flow.py)
    flow: bool = False
    # consecutive frames for the temporal gradient (set by the methods that read `tgrad`,
    # mmvssl/methods/motion_stream.py): `video_next`, the source frame right after each sampled frame
    # of `video`'s views, cropped / flipped / colour-augmented with it (mmvssl/data/motion.py)
    next_frames: bool = False
    # concur: the curriculum, set by the method (mmvssl.methods.concur): the two clips' distance may reach
    # span_start of what the video allows at step 0, all of it after curriculum_steps optimizer steps; a
    # sample's step is its batch's place in the stream (one batch a step; exact when no sample failed to decode)
    curriculum_steps: int = 0
    span_start: float = 1.0

    @property
    def multi_view(self) -> bool:
        return (self.sampler in ("cvrl", "overlap", "concur", "carl", "teg", "svt")
                or (self.sampler in ("uniform", "same") and self.num_clips > 1))

    @property
    def groups(self) -> dict[str, tuple[int, int, int]]:
        """Named view groups beyond `video`: name -> (views, frames, size). SVT's local views; TeG's long
        clip, decoded at the short clip's rate (so with more frames)."""
        if self.sampler == "svt" and self.num_local:
            return {"local": (self.num_local, self.local_frames or self.num_frames, self.local_size or self.size)}
        if self.sampler == "teg":
            return {"long": (1, max(1, round(self.num_frames * self.long_scale)), self.size)}
        return {}

    def span_share(self, batch_number: int) -> float:
        """concur: the share of the video the clips' distance may reach for the stream's batch `batch_number`."""
        if self.curriculum_steps <= 0:
            return 1.0
        return min(1.0, self.span_start + (1.0 - self.span_start) * batch_number / self.curriculum_steps)

    @property
    def window(self) -> float:
        return self.num_frames / self.fps

    @property
    def audio_samples(self) -> int:
        return int(round(self.window * self.audio_rate))


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float, normalised."""
    return normalize_video(torch.from_numpy(frames).permute(3, 0, 1, 2))


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, T, H, W) -> float normalised with VIDEO_MEAN / VIDEO_STD: one conversion
    pass and two in-place passes (the per-channel constants are equal, so scalars suffice)."""
    return video.float().sub_(255.0 * float(VIDEO_MEAN[0])).div_(255.0 * float(VIDEO_STD[0]))


class DecodeSamples:
    """Pipeline stage: raw tar samples -> decoded samples; failures are skipped and counted."""

    def __init__(self, spec: SampleSpec, max_error_rate: float = 1.0, position: "StreamPosition | None" = None,
                 min_samples_for_rate: int = 50, tokenizer=None):
        self.spec = spec
        self.position = position or StreamPosition()
        # the model's own (mmvssl.data.text.tokenizer_for: an imported model's source tokenizer), else CLIP's BPE
        self.tokenizer = tokenizer or build_tokenizer("clip-bpe", spec.context_length)
        self.max_error_rate = max_error_rate
        self.min_samples_for_rate = min_samples_for_rate
        self.augmenter = Augmenter(spec.augment, spec.size)
        self.group_augmenters = {  # SVT's local views crop with DINO's small areas; other groups as `video`
            name: Augmenter(dataclasses.replace(spec.augment, crop_scale=spec.augment.local_crop_scale)
                            if name == "local" else spec.augment, size)
            for name, (_, _, size) in spec.groups.items()}

    def __call__(self, src):
        rank, slot = self.position.slot()
        seen = failed = pending = 0
        bad_shards: dict[str, int] = {}
        read: list[tuple[str, int]] = []  # epoch mode: (shard, position) of the raw samples since the last yield
        for index, raw in enumerate(src):
            if "__shard_index__" in raw:  # data.mode=epoch training (elastic.ElasticEpoch)
                read.append((raw.get("__url__", "?"), raw["__shard_index__"]))
            if is_failed_download(raw):
                continue  # video2dataset wrote the metadata of a download that failed: nothing to decode
            seen += 1
            # one generator per sample, derived from its place in this worker's stream, so a
            # resumed stream that skips samples draws the same windows as an uninterrupted one;
            # in epoch mode from its place in its shard, so any number of processes draws the same
            where = (f"{raw['__epoch__']}/{raw.get('__url__')}/{raw['__shard_index__']}" if "__shard_index__" in raw
                     else f"{rank}/{slot}/{raw.get('__index__', index)}")
            rng = random.Random(f"{self.spec.seed}/{where}")
            position = raw.get("__index__", index)  # the stream's batch this sample goes to (concur's step)
            batch_number = (position // self.position.batch_size) * self.position.num_workers + slot
            try:
                sample = self.decode(raw, rng, batch_number)
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
            if read:
                sample["_read"], read = read, []
            yield sample

    def decode(self, raw: dict, rng: random.Random, batch_number: int = 0) -> dict:
        spec = self.spec
        key = raw.get("__key__", "?")
        data = video_bytes(raw)  # DecodeError naming the key when there is no video member
        meta = metadata(raw, with_caption=True)  # DecodeError when it is not a JSON object
        duration = float(meta.get("duration") or 0.0)
        if duration <= 0:  # shards from other tools: read it from the container header
            duration = probe(data, check_decode=False).duration
        windows = view_windows(spec.sampler, duration, spec.window, rng, spec.train, spec.long_scale,
                               spec.num_clips, spec.num_global, spec.num_local, fps=spec.fps,
                               span_share=spec.span_share(batch_number))
        cached = None
        if spec.teacher_features is not None:  # the first view's frame times, as decode_window computes them
            start, length = windows[0]
            times = torch.from_numpy(frame_times(start, spec.num_frames, spec.num_frames / length))
            cached = pair_cached_frames(raw, times, spec.teacher_features)  # (T, D) float16
        augment = self.augmenter.video_transform is not None
        # each view's (group, frames, size, augmenter): `video`'s views, then each named group's in order
        local = len(windows) - sum(n for n, _, _ in spec.groups.values())  # the first view of a named group
        plan = [(None, spec.num_frames, spec.size, self.augmenter)] * local
        for name, (n, frames_n, size) in spec.groups.items():
            plan += [(name, frames_n, size, self.group_augmenters[name])] * n
        videos, crops, audio, first = [], [], None, None
        flips, nexts = [], []
        for v, (start, length) in enumerate(windows):
            _, frames_n, size, augmenter = plan[v]  # without augmentation, decoded at the group's size
            if v == 0 or windows[v] != windows[v - 1] or plan[v][0] != plan[v - 1][0]:  # `same` decodes once
                clip = decode_window(data, start, frames_n, frames_n / length,
                                     None if augment else size, spec.audio_rate if v == 0 else None,
                                     short_side=round(spec.size * spec.augment.decode_short_side) if augment else None,
                                     next_frames=spec.next_frames and v < local)
            frames = torch.from_numpy(clip.frames)  # (T, H, W, 3) uint8
            if clip.next_frames is not None:  # augmented as one clip with its frames: one draw for both
                frames = torch.cat([frames, torch.from_numpy(clip.next_frames)])  # (2T, H, W, 3)
            frames, crop, flipped = augmenter.video_crop_flip(frames, rng) if augment else (
                frames, [0.0, 0.0, 1.0, 1.0], False)
            if clip.next_frames is not None:
                frames, following = frames.chunk(2)
                nexts.append(following.permute(3, 0, 1, 2))  # uint8 (C, T, H, W)
            crops.append(crop)  # [x0, y0, x1, y1], a share of the decoded frame
            flips.append(flipped)
            videos.append(frames.permute(3, 0, 1, 2))  # uint8 (C, T, H, W); collate normalises the batch
            if v == 0:
                first, audio = clip, clip.audio
        has_audio = audio is not None
        if has_audio and len(audio) != spec.audio_samples:  # a first view longer or shorter than the window
            audio = np.pad(audio[:spec.audio_samples], (0, max(0, spec.audio_samples - len(audio))))  # (carl, svt)
        audio = self.augmenter.audio(torch.from_numpy(audio), rng) if has_audio else torch.zeros(spec.audio_samples)
        # the text source is drawn last, so that adding sources leaves the windows and augmentation unchanged
        texts, generated = select_source_texts(meta, first.start, first.end, spec.num_candidates,
                                               spec.text_sources, rng)
        k = spec.num_candidates
        tokens = torch.zeros(k, spec.context_length, dtype=torch.long)
        text_mask = torch.zeros(k, dtype=torch.bool)
        if texts:
            tokens[:len(texts)] = self.tokenizer(texts)
            text_mask[:len(texts)] = True
        video = torch.stack(videos[:local]) if spec.multi_view else videos[0]  # (V, C, T, H, W) or (C, T, H, W)
        sample = {
            "video": video, "audio": audio, "text": tokens, "text_mask": text_mask,
            "has_video": True, "has_audio": has_audio, "has_text": bool(texts), "text_generated": generated,
            "key": key, "meta": {**meta, "window": [first.start, first.end], "source_shard": raw.get("__url__"),
                                 "source_set": raw.get("__source__", "")},
        }
        if nexts:  # the frames right after `video`'s frames, same shape
            sample["video_next"] = torch.stack(nexts) if spec.multi_view else nexts[0]
        for name in spec.groups:  # e.g. video/local (L, C, t, h, w)
            sample[group_key("video", name)] = torch.stack([x for x, p in zip(videos, plan) if p[0] == name])
        if spec.multi_view:  # where each view lies in time and space, `video`'s views then each group's
            sample["view_times"] = torch.tensor([[s, s + n] for s, n in windows], dtype=torch.float64)
            sample["view_crops"] = torch.tensor(crops, dtype=torch.float32)  # before any flip
            sample["meta"]["view_flips"] = flips  # whether each view was mirrored after its crop
        if spec.flow:  # cached optical flow of `video`'s views, paired in time and cropped / flipped with them
            flows = [pair_flow(raw, torch.from_numpy(frame_times(s, spec.num_frames, spec.num_frames / n)),
                               crops[v] if augment else None, flips[v], spec.size)
                     for v, (s, n) in enumerate(windows[:video.shape[0] if spec.multi_view else 1])]
            sample["flow"] = torch.stack(flows) if spec.multi_view else flows[0]  # ([V,] 2, T, H, W) float32
            sample["has_flow"] = True
        if cached is not None:
            sample["teacher_frames"] = cached
        return sample


def collate(samples: list[dict]) -> dict:
    batch = {
        # stacked as uint8 (a quarter of the bytes to copy), then converted once: (B, C, T, H, W) or (B, V, C, T, H, W)
        "video": normalize_video(torch.stack([s["video"] for s in samples])),
        "audio": torch.stack([s["audio"] for s in samples]),  # (B, S)
        "text": torch.stack([s["text"] for s in samples]),  # (B, K, L)
        "text_mask": torch.stack([s["text_mask"] for s in samples]),  # (B, K)
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "failed": torch.tensor(sum(s["_failed"] for s in samples)),  # samples skipped on the way
        "text_generated": torch.tensor([s["text_generated"] for s in samples], dtype=torch.bool),  # (B,)
    }
    if "_read" in samples[0]:  # epoch mode: what this batch consumed, failures included (EpochRecord)
        batch["read"] = [r for s in samples for r in s.get("_read", ())]
    if "video_next" in samples[0]:  # consecutive frames (SampleSpec.next_frames), normalised as `video`
        batch["video_next"] = normalize_video(torch.stack([s["video_next"] for s in samples]))
    for k in samples[0]:
        if k in VIEW_KEYS:
            batch[k] = torch.stack([s[k] for s in samples])  # (B, V, 2) / (B, V, 4)
        elif is_group(k):  # a named view group, e.g. video/local
            batch[k] = normalize_video(torch.stack([s[k] for s in samples]))
    if "teacher_frames" in samples[0]:  # cached teacher features (teacher.cached)
        batch["teacher_frames"] = torch.stack([s["teacher_frames"] for s in samples]).float()  # (B, T, D)
    for m in MODALITIES:
        if m not in batch and m in samples[0]:  # a motion stream the loader yields (flow): float already
            batch[m] = torch.stack([s[m] for s in samples])  # (B, [V,] 2, T, H, W)
        if presence_key(m) in samples[0]:
            batch[presence_key(m)] = torch.tensor([s[presence_key(m)] for s in samples], dtype=torch.bool)
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
                  max_error_rate: float = 0.1, start_batch: int = 0, num_workers: int = 0,
                  mode: str | None = None, epoch_length: int | None = None,
                  member_limits: MemberLimits | None = None, tokenizer=None,
                  record: EpochRecord | None = None) -> wds.DataPipeline:
    """mode: "resampled" (default when training) or "epoch" (default for evaluation). Members over
    `member_limits` (data.max_member_mb) are refused from the tar header, the sample skipped and counted.
    Training in epoch mode reads the rest of the epoch `record` describes (mmvssl.data.elastic), split
    over this run's processes and workers, whatever their number when the record was made."""
    sets = parse_sources(shards)
    mode = mode or ("resampled" if spec.train else "epoch")
    position = StreamPosition(start_batch, batch_size, num_workers)
    if mode == "resampled":
        def one_set(s, labelled=None):
            return wds.DataPipeline(
                wds.ResampledShards(s.urls, seed=spec.seed, deterministic=True, worker_seed=position.shard_seed),
                tar_stage(skip_unreadable_shard, member_limits), tag_source(s.name),
                *([] if labelled is None else [select_labelled(spec.labelled_keys, labelled)]))
        streams = [(s, None, s.weight) for s in sets]
        if spec.labelled_share > 0 and spec.labelled_keys is not None:  # each set split: labelled / unlabelled
            share = min(1.0, spec.labelled_share)
            streams = [(s, labelled, s.weight * w) for s in sets
                       for labelled, w in ((True, share), (False, 1.0 - share)) if w > 0]
        if len(streams) == 1:
            stages = [*one_set(*streams[0][:2]).pipeline]
        else:
            def mixed():
                rank, slot = position.slot()
                rng = random.Random(f"{spec.seed}/mix/{rank}/{slot}")
                return mix([one_set(s, labelled) for s, labelled, _ in streams], [w for *_, w in streams], rng)
            stages = [mixed]
        stages += [wds.detshuffle(shuffle_buffer, initial=min(shuffle_buffer, 64), seed=spec.seed), position]
    elif mode == "epoch":
        if spec.train and spec.labelled_share > 0 and spec.labelled_keys is not None:
            raise MmvsslError(f"data.labelled_share={spec.labelled_share} draws labelled samples at that share of a "
                              f"resampled stream; data.mode=epoch reads every sample once: use data.mode=resampled, "
                              f"or data.labelled_share=0 (each labelled and unlabelled sample once per epoch)")
        stages = [ElasticEpoch(sets, batch_size, seed=spec.seed, limits=member_limits, record=record) if spec.train
                  else EpochSamples(sets, seed=spec.seed, shuffle=False, limits=member_limits)]
        if spec.train and shuffle_buffer > 1:
            stages.append(wds.detshuffle(shuffle_buffer, initial=min(shuffle_buffer, 64), seed=spec.seed))
    else:
        raise MmvsslError(f"loader mode must be 'resampled' or 'epoch', got '{mode}'")
    stages += [DecodeSamples(spec, max_error_rate, position, tokenizer=tokenizer),
               wds.batched(batch_size, collation_fn=collate, partial=not spec.train or mode == "epoch")]
    pipeline = wds.DataPipeline(*stages)
    if mode == "resampled" and epoch_length:  # batches per process per epoch, shared by its workers
        pipeline = pipeline.with_epoch(-(-epoch_length // max(1, num_workers)))
    return pipeline


def build_loader(shards: str, spec: SampleSpec, batch_size: int, num_workers: int = 0,
                 shuffle_buffer: int = 256, max_error_rate: float = 0.1,
                 start_batch: int = 0, mode: str | None = None, epoch_length: int | None = None,
                 epoch: int = 0, member_limits: MemberLimits | None = None,
                 tokenizer=None, record: EpochRecord | None = None) -> torch.utils.data.DataLoader:
    """Batches per the Batch contract. Training: an endless seeded stream; `start_batch=N` resumes
    it after N consumed batches; `epoch_length` makes it an epoch of that many batches. Evaluation
    (or mode="epoch"): every sample once, split over processes and workers; `epoch` reseeds the
    shard order of a training epoch; `record` (training, epoch mode) is what of it was consumed
    before a resume. `shards` may mix sets: "a=DIR@0.7;b=DIR@0.3"."""
    dataset = build_dataset(shards, spec, batch_size, shuffle_buffer, max_error_rate, start_batch, num_workers,
                            mode, epoch_length, member_limits, tokenizer, record)
    if isinstance(dataset.pipeline[0], EpochSamples):
        dataset.pipeline[0].set_epoch(epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None)
