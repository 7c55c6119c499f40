"""Generate small media files of many kinds (codecs, containers, rotation, VFR, audio layouts)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def make_media(path, codec: str = "libx264", container_format: str | None = None, size=(64, 48),
               fps: int = 10, seconds: float = 2.0, audio_codec: str | None = "aac", audio_rate: int = 16000,
               channels: int = 1, rotation: int = 0, vfr: bool = False, pix_fmt: str = "yuv420p",
               tone_hz: float = 440.0, mark: bool = True) -> Path:
    """Frame i: red = 255 i / n everywhere and, with `mark`, a white bar in the left eighth of the
    stored picture (so rotation is visible); audio a sine of tone_hz. VFR: frame gaps alternate
    1/fps and 2/fps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = av.open(str(path), "w", format=container_format)
    vs = out.add_stream(codec, rate=fps)
    vs.width, vs.height = size
    vs.pix_fmt = pix_fmt
    if codec in ("libx264", "libx265", "libvpx-vp9", "mpeg4"):
        vs.gop_size = 2 * fps
    if vfr:
        vs.codec_context.time_base = Fraction(1, fps * 2)
    if rotation:
        vs.set_display_rotation(rotation)
    astream = None
    if audio_codec:
        astream = out.add_stream(audio_codec, rate=audio_rate)
        astream.layout = "mono" if channels == 1 else "stereo"
    n = int(round(seconds * fps)) if not vfr else int(round(seconds * fps / 1.5))
    pts = 0
    for i in range(n):
        img = np.zeros((size[1], size[0], 3), np.uint8)
        img[..., 0] = int(255 * i / n)
        if mark:
            img[:, : max(1, size[0] // 8)] = 255
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        if vfr:
            frame.pts, frame.time_base = pts, Fraction(1, fps * 2)
            pts += 2 if i % 2 == 0 else 4
        for packet in vs.encode(frame):
            out.mux(packet)
    for packet in vs.encode():
        out.mux(packet)
    if astream is not None:
        rate = astream.rate
        t = np.arange(int(seconds * rate)) / rate
        wave = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
        planes = np.stack([wave] * channels)
        step = astream.codec_context.frame_size or 1024
        for s in range(0, planes.shape[1], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes[:, s:s + step]), format="fltp",
                                               layout=astream.layout.name)
            frame.sample_rate, frame.pts = rate, s
            for packet in astream.encode(frame):
                out.mux(packet)
        for packet in astream.encode():
            out.mux(packet)
    out.close()
    return path


def make_huge_header(path, size=(8000, 8000)) -> Path:
    """One MJPEG frame of size (w, h) in AVI: cheap to write, huge to decode."""
    path = Path(path)
    out = av.open(str(path), "w", format="avi")
    vs = out.add_stream("mjpeg", rate=1)
    vs.width, vs.height = size
    vs.pix_fmt = "yuvj420p"
    frame = av.VideoFrame(size[0], size[1], "yuvj420p")
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    for packet in vs.encode(frame):
        out.mux(packet)
    for packet in vs.encode():
        out.mux(packet)
    out.close()
    return path
