"""Decode a time window of video frames and audio samples from a media file or its bytes.

Only the window is decoded: we seek to the keyframe before the window start, decode up to
its end, and resize each frame while converting it (`VideoFrame.reformat`). Audio for the same
window is resampled to the requested rate and downmixed to mono. PyAV carries its own FFmpeg,
so nothing needs to be installed on the system.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass

import av
import numpy as np


class DecodeError(Exception):
    """A media file that cannot be used; the message is the reason, fit for a report."""


@dataclass
class MediaInfo:
    duration: float
    fps: float
    width: int
    height: int
    has_audio: bool
    sample_rate: int | None
    audio_channels: int | None
    video_codec: str
    audio_codec: str | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    audio: np.ndarray | None  # (S,) float32 mono in [-1, 1], None when the file has no audio
    start: float
    end: float


def _open(source: bytes | str | os.PathLike):
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return av.open(io.BytesIO(bytes(source)), mode="r")
        return av.open(os.fspath(source), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DecodeError(f"not a readable media file ({_short(e)})") from None


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _stream_duration(stream, container) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def probe(source: bytes | str | os.PathLike, max_pixels: int = 4096 * 4096,
          max_seconds: float = 6 * 3600.0, check_decode: bool = True) -> MediaInfo:
    """Read the streams' metadata and (by default) decode the first video frame.

    Raises DecodeError with the reason when the file is unusable or past the limits.
    """
    with _open(source) as container:
        if not container.streams.video:
            raise DecodeError("no video stream")
        vs = container.streams.video[0]
        width, height = vs.codec_context.width, vs.codec_context.height
        if not width or not height:
            raise DecodeError("video stream has no frame size")
        if width * height > max_pixels:
            raise DecodeError(f"frame size {width}x{height} exceeds the limit of {max_pixels} pixels")
        duration = _stream_duration(vs, container)
        fps = float(vs.average_rate or vs.guessed_rate or 0.0)
        if duration > max_seconds:
            raise DecodeError(f"duration {duration:.1f}s exceeds the limit of {max_seconds:.0f}s")
        aus = container.streams.audio[0] if container.streams.audio else None
        if check_decode:
            try:
                next(container.decode(video=0))
            except StopIteration:
                raise DecodeError("video stream has no decodable frame") from None
            except (av.error.FFmpegError, ValueError) as e:
                raise DecodeError(f"corrupt video stream ({_short(e)})") from None
        if duration <= 0:
            raise DecodeError("video has zero duration")
        return MediaInfo(
            duration=duration, fps=fps, width=width, height=height, has_audio=aus is not None,
            sample_rate=aus.codec_context.sample_rate if aus is not None else None,
            audio_channels=aus.codec_context.channels if aus is not None else None,
            video_codec=vs.codec_context.name, audio_codec=aus.codec_context.name if aus else None)


def _cover_size(width: int, height: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Smallest (w, h) with the source aspect that covers (out_w, out_h)."""
    scale = max(out_w / width, out_h / height)
    return max(out_w, round(width * scale)), max(out_h, round(height * scale))


def _center_crop(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (h - out_h) // 2, (w - out_w) // 2
    return img[top:top + out_h, left:left + out_w]


def decode_window(source: bytes | str | os.PathLike, start: float, num_frames: int, fps: float,
                  size: int | tuple[int, int] | None = None, audio_rate: int | None = 16000) -> Clip:
    """Decode `num_frames` frames at `fps` from `start` seconds, and the audio of that window.

    Frame i is the last source frame shown at time start + i / fps (frames past the end repeat
    the last frame). `size` resizes (aspect kept, centre crop) to (H, W); an int means square.
    Audio covers [start, start + num_frames / fps) exactly: round(duration * audio_rate) samples,
    zero-padded where the file's audio is shorter.
    """
    if num_frames < 1 or fps <= 0:
        raise ValueError(f"need num_frames >= 1 and fps > 0, got {num_frames}, {fps}")
    out_h, out_w = (size, size) if isinstance(size, int) else (size or (None, None))
    window = num_frames / fps
    end = start + window
    times = start + np.arange(num_frames) / fps
    with _open(source) as container:
        if not container.streams.video:
            raise DecodeError("no video stream")
        vs = container.streams.video[0]
        frames = _decode_video(container, vs, times, out_h, out_w)
        audio = None
        if audio_rate and container.streams.audio:
            audio = _decode_audio(container, container.streams.audio[0], start, end, audio_rate)
    return Clip(frames=frames, audio=audio, start=float(start), end=float(end))


def _decode_video(container, vs, times: np.ndarray, out_h, out_w) -> np.ndarray:
    tb = vs.time_base
    first_pts = vs.start_time or 0
    container.seek(max(0, int(times[0] / tb) + first_pts), stream=vs, backward=True, any_frame=False)
    picked: list[np.ndarray | None] = [None] * len(times)
    last, last_array = None, None  # the newest decoded frame; converted only if a time picks it

    def convert(frame) -> np.ndarray:
        if out_h is None:
            return frame.to_ndarray(format="rgb24")
        w, h = _cover_size(frame.width, frame.height, out_h, out_w)  # resize inside the conversion
        return _center_crop(frame.to_ndarray(width=w, height=h, format="rgb24"), out_h, out_w)

    i = 0
    try:
        for frame in container.decode(vs):
            if frame.pts is None:
                continue
            t = float((frame.pts - first_pts) * tb)
            # the frame shown at times[i] is the newest frame that starts at or before it
            while i < len(times) and t > times[i] + 1e-6:
                if last is not None and last_array is None:
                    last_array = convert(last)
                picked[i] = last_array
                i += 1
            if i >= len(times):
                break
            last, last_array = frame, None
    except (av.error.FFmpegError, ValueError) as e:
        if last is None:
            raise DecodeError(f"corrupt video stream ({_short(e)})") from None
    if last is not None and last_array is None:
        last_array = convert(last)
    last = last_array
    for j in range(i, len(times)):  # past the end of the stream: hold the last frame
        picked[j] = last
    if last is None:
        raise DecodeError("no decodable video frame in the window")
    first = next(p for p in picked if p is not None)
    return np.stack([p if p is not None else first for p in picked])


def _decode_audio(container, aus, start: float, end: float, rate: int) -> np.ndarray:
    want = int(round((end - start) * rate))
    out = np.zeros(want, dtype=np.float32)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    tb = aus.time_base
    first_pts = aus.start_time or 0
    container.seek(max(0, int(start / tb) + first_pts), stream=aus, backward=True, any_frame=False)
    pos = None  # stream time (s) of the next resampled sample
    try:
        for frame in container.decode(aus):
            if frame.pts is None:
                continue
            if pos is None:
                pos = float((frame.pts - first_pts) * tb)
            for rframe in resampler.resample(frame):
                data = rframe.to_ndarray().reshape(-1)
                offset = int(round((pos - start) * rate))  # index of data[0] in the window
                pos += len(data) / rate
                lo, hi = max(0, offset), min(want, offset + len(data))
                if hi > lo:
                    out[lo:hi] = data[lo - offset:hi - offset]
            if pos is not None and pos >= end:
                break
    except (av.error.FFmpegError, ValueError):
        pass  # a damaged audio tail leaves silence; the video decides whether the sample is usable
    return out
