"""Shared fixtures: small generated videos, a tiny demo dataset and its shards."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest


def make_video(path, seconds: float = 3.0, fps: int = 10, size=(96, 80), audio_rate: int | None = 16000,
               tone_hz: float = 440.0, codec: str = "libx264", container_format: str | None = None) -> Path:
    """A video whose red channel ramps with the frame index (frame i has red = 255 * i / n)
    and, when audio_rate is set, a mono sine tone of tone_hz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = av.open(str(path), "w", format=container_format)
    vs = out.add_stream(codec, rate=fps)
    vs.width, vs.height = size
    vs.pix_fmt = "yuv420p"
    vs.gop_size = 2 * fps
    astream = None
    if audio_rate:
        astream = out.add_stream("aac" if codec != "libvpx-vp9" else "libopus", rate=audio_rate if codec != "libvpx-vp9" else 48000)
        astream.layout = "mono"
    n = int(round(seconds * fps))
    for i in range(n):
        img = np.zeros((size[1], size[0], 3), np.uint8)
        img[..., 0] = int(255 * i / n)
        for packet in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            out.mux(packet)
    for packet in vs.encode():
        out.mux(packet)
    if astream is not None:
        rate = astream.rate
        t = np.arange(int(seconds * rate)) / rate
        wave = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
        step = astream.codec_context.frame_size or 1024
        for s in range(0, len(wave), step):
            frame = av.AudioFrame.from_ndarray(wave[None, s:s + step], format="flt", layout="mono")
            frame.sample_rate, frame.pts = rate, s
            for packet in astream.encode(frame):
                out.mux(packet)
        for packet in astream.encode():
            out.mux(packet)
    out.close()
    return path


@pytest.fixture
def video_factory():
    return make_video


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small procedural dataset (train + val) shared by the data, training and eval tests."""
    from mmvssl.data.synth import make_synthetic_dataset
    root = tmp_path_factory.mktemp("demo") / "data"
    make_synthetic_dataset(root, seed=0, num_train=24, num_val=12, seconds=3.0)
    return root


@pytest.fixture(scope="session")
def demo_shards(demo_data, tmp_path_factory) -> dict:
    from mmvssl.data.shards import build_shards
    out = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):
        build_shards(demo_data / split, out / split, captions=demo_data / split / "captions.jsonl", samples_per_shard=8)
    return {"train": out / "train", "val": out / "val"}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def trained_run(demo_shards, tmp_path_factory) -> Path:
    """A few steps of pretraining on the demo shards (run folder with model/ and checkpoints/)."""
    from mmvssl.config import load_config
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(data_path("configs", "demo", "tiny.yaml"), [
        f"data.shards={demo_shards['train']}", "data.batch_size=4", "data.num_workers=0",
        "train.max_steps=4", "train.save_every=2", "train.log_every=1", "train.warmup_steps=1",
        f"train.output_dir={out}"])
    pretrain(cfg)
    return out
