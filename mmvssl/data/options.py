"""The `data:` section of an experiment config (schema only; read by mmvssl.config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    shards: str = ""  # a folder of .tar shards, a brace pattern, or several joined by ','
    batch_size: int = 16  # per process
    num_workers: int = 2
    num_frames: int = 8
    fps: float = 4.0  # frames per second of the sampled clip: the window is num_frames / fps long
    size: int = 64  # frames are resized (aspect kept, centre/random crop) to size x size
    audio_rate: int = 16000
    context_length: int = 32  # text tokens
    num_candidates: int = 2  # MIL-NCE: the overlapping narration + nearest ones in time
    shuffle_buffer: int = 256
    max_error_rate: float = 0.1  # stop when more than this share of samples fail to decode
    seed: int | None = None  # defaults to train.seed
