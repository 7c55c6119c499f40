"""Cached teacher features: the `<key>.teacher.safetensors` shard member that
`mmvssl shards add-features` writes, and its pairing with the frames a clip sampler chose.

The member is a safetensors file (never a pickle) with two tensors,
`features` (N, D) float16 (the frozen teacher's pooled embedding of every cached frame) and
`times` (N,) float32 (seconds: 0, 1/F, 2/F, ... over the whole video), and string metadata:
the teacher fingerprint (`arch`, `weights`, `image_size`, with `pretrained` and `embed_dim` for
people), the cache's `fps` F, the decode `size` and the video `duration`.

Pairing (`pair_cached_frames`, through mmvssl/data/cachetimes.py, which cached optical flow
shares): each sampled frame time t (clamped to the video's duration,
where the decoder holds the last frame) takes the cached frame nearest in time. Inside the
video the nearest cached time is at most half a cached step, 1 / (2F), away; at the tail up to
one step. A sampled time farther than one step (plus 1 ms) from every cached time means the
features do not cover the window, an error naming the shard and key, as are a missing member
and features made by another teacher than the config names.

Beside the shards `add-features` writes `features_report.json` (the teacher fingerprint, the
cache settings, per shard the samples written and those skipped with their reason);
`check_feature_folders` reads it before training, so that a wrong folder fails at once.
"""

from __future__ import annotations

import json
import os
import struct

import torch

from ..data.cachetimes import TIME_SLACK, cached_times, nearest_indices  # noqa: F401 (the time pairing, shared with flow)
from ..errors import ConfigError, MmvsslError

MEMBER = "teacher.safetensors"  # the member's extension: <key>.teacher.safetensors
REPORT = "features_report.json"
FORMAT = "mmvssl-teacher-features/1"
IDENTITY_KEYS = ("arch", "weights", "image_size")  # what makes two teachers the same teacher


def describe(identity: dict) -> str:
    """'ViT-B-32 (pretrained openai, image size 224)' for error messages."""
    return (f"{identity.get('arch', '?')} (pretrained '{identity.get('pretrained', identity.get('weights', '?'))}', "
            f"image size {identity.get('image_size', '?')})")


def same_teacher(a: dict, b: dict) -> bool:
    return all(str(a.get(k)) == str(b.get(k)) for k in IDENTITY_KEYS)


def encode_member(features: torch.Tensor, times: torch.Tensor, identity: dict, fps: float, size: int,
                  duration: float) -> bytes:
    """(N, D) features and (N,) times -> the bytes of a .teacher.safetensors member."""
    from safetensors.torch import save

    from ..fsio import stable_safetensors
    if features.ndim != 2 or times.shape != (features.shape[0],):
        raise ValueError(f"teacher features (N, D) and times (N,) expected, got {tuple(features.shape)} "
                         f"and {tuple(times.shape)}")
    metadata = {k: str(v) for k, v in identity.items()}
    metadata.update({"format": FORMAT, "fps": repr(float(fps)), "size": str(int(size)),
                     "duration": repr(float(duration))})
    tensors = {"features": features.to(torch.float16).contiguous(), "times": times.float().contiguous()}
    return stable_safetensors(save(tensors, metadata=metadata))  # the same bytes in every run


def _metadata(data: bytes) -> dict:
    # safetensors' Python API gives the metadata only for a file on disk (safe_open); the header is
    # an 8-byte little-endian length and a JSON object, so reading it from bytes takes three lines
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__") or {}


def decode_member(data: bytes) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Member bytes -> (features (N, D) float16, times (N,) float32, metadata)."""
    from safetensors.torch import load
    try:
        meta = _metadata(data)
        tensors = load(bytes(data))
        features, times = tensors["features"], tensors["times"]
    except Exception as e:  # struct, JSON, SafetensorError, a missing tensor: all mean a broken member
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"not a teacher-features member ({reason})") from None
    if features.ndim != 2 or times.shape != (features.shape[0],):
        raise ValueError(f"teacher features (N, D) and times (N,) expected, got {tuple(features.shape)} "
                         f"and {tuple(times.shape)}")
    return features, times, meta


def pair_cached_frames(raw: dict, sampled: torch.Tensor, expected: dict) -> torch.Tensor:
    """The cached teacher features (T, D) float16 of a raw tar sample for its sampled frame times;
    MmvsslError naming the shard and key when they are missing, broken, made by another teacher
    than `expected`, or do not cover the window."""
    where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}"
    if MEMBER not in raw:
        raise MmvsslError(f"{where} has no cached teacher features (.{MEMBER}); teacher.cached=true needs shards "
                          f"written by `mmvssl shards add-features`")
    try:
        features, times, meta = decode_member(raw[MEMBER])
    except ValueError as e:
        raise MmvsslError(f"{where}: .{MEMBER}: {e}") from None
    if not same_teacher(meta, expected):
        raise MmvsslError(f"{where}: cached features come from teacher {describe(meta)}, but the config names "
                          f"{describe(expected)}; run `mmvssl shards add-features` with the config's teacher")
    try:
        index = nearest_indices(times, sampled, float(meta.get("duration", "inf")), float(meta.get("fps", "1")))
    except ValueError as e:
        raise MmvsslError(f"{where}: {e}") from None
    return features[index]  # (T, D)


def check_feature_folders(urls: list[str], expected: dict) -> int:
    """Before training: every shard folder holds a features report of the expected teacher that lists
    the shard. Returns the features' width D; ConfigError (one line, naming the folder) otherwise."""
    dims, reports = set(), {}
    for url in urls:
        folder = os.path.dirname(os.path.abspath(url))
        if folder not in reports:
            path = os.path.join(folder, REPORT)
            if not os.path.isfile(path):
                raise ConfigError(f"teacher.cached: {folder} has no {REPORT}, so its shards carry no teacher "
                                  f"features; write them with `mmvssl shards add-features TEACHER --shards "
                                  f"{folder} --out DIR` and train on DIR")
            try:
                reports[folder] = json.loads(open(path).read())
            except json.JSONDecodeError as e:
                raise ConfigError(f"teacher.cached: {path} is not JSON ({e})") from None
            found = reports[folder].get("teacher") or {}
            if not same_teacher(found, expected):
                raise ConfigError(f"teacher.cached: the features in {folder} come from teacher {describe(found)}, "
                                  f"but the config names {describe(expected)}; re-run `mmvssl shards "
                                  f"add-features` with the config's teacher")
            dims.add(int(found.get("embed_dim") or 0))
        if os.path.basename(url) not in (reports[folder].get("shards") or {}):
            raise ConfigError(f"teacher.cached: {url} is not listed in {os.path.join(folder, REPORT)}: "
                              f"`mmvssl shards add-features` has not finished it; re-run it to resume")
    if len(dims) != 1 or not next(iter(dims)):
        raise ConfigError(f"teacher.cached: the features reports disagree on the feature width ({sorted(dims)})")
    return dims.pop()
