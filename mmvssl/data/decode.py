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

from .sampling import frame_times


AUDIO_PREROLL = 0.1  # seconds decoded before an audio window and thrown away
MAX_PIXELS = 4096 * 4096  # largest frame (width x height) every decoder here accepts: a small
#                           file can declare a huge frame (a decompression bomb), so this is checked from
#                           the stream header before any frame is decoded


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
    rotation: int = 0  # degrees counter-clockwise applied on decode; width/height are upright


    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    audio: np.ndarray | None  # (S,) float32 mono in [-1, 1], None when the file has no audio
    start: float
    end: float
    # (T, H, W, 3) uint8: the source frame right after each frame of `frames` (the last one repeated
    # past the end of the stream), when decode_window was asked for next_frames; None otherwise
    next_frames: np.ndarray | None = None


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


def probe(source: bytes | str | os.PathLike, max_pixels: int = MAX_PIXELS,
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
        _check_frame_size(width, height, max_pixels)
        duration = _stream_duration(vs, container)
        fps = float(vs.average_rate or vs.guessed_rate or 0.0)
        if duration > max_seconds:
            raise DecodeError(f"duration {duration:.1f}s exceeds the limit of {max_seconds:.0f}s")
        aus = container.streams.audio[0] if container.streams.audio else None
        rotation = 0
        if check_decode:
            try:
                rotation = _quarter_turns(next(container.decode(video=0))) * 90
                if rotation % 180:
                    width, height = height, width
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
            video_codec=vs.codec_context.name, audio_codec=aus.codec_context.name if aus else None,
            rotation=rotation)


def _check_frame_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DecodeError(f"frame size {width}x{height} exceeds the limit of {max_pixels} pixels")


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that make the frame upright (its display matrix)."""
    try:
        return int(round((frame.rotation or 0) / 90.0)) % 4
    except (AttributeError, TypeError, ValueError):
        return 0


def to_upright_rgb(frame, size: tuple[int, int] | None = None, short_side: int | None = None) -> np.ndarray:
    """A decoded frame as upright (H, W, 3) uint8 RGB, its rotation metadata applied.

    `size` (H, W): resized during the conversion to cover it, then centre-cropped; `short_side`:
    resized, aspect kept, so the shorter side has that length. At most one of them.
    """
    turns = _quarter_turns(frame)
    src_w, src_h = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
    if size is not None:
        w, h = _cover_size(src_w, src_h, size[0], size[1])
    elif short_side is not None:
        scale = short_side / min(src_w, src_h)
        w, h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
    else:
        w, h = src_w, src_h
    if turns % 2:  # convert in the stored orientation, then turn
        w, h = h, w
    if (w, h) == (frame.width, frame.height):
        img = frame.to_ndarray(format="rgb24")
    else:  # resize inside the colour conversion (one swscale pass)
        img = frame.to_ndarray(width=w, height=h, format="rgb24")
    if turns:
        img = np.ascontiguousarray(np.rot90(img, turns))
    if size is not None:
        img = _center_crop(img, size[0], size[1])
    return img


def _cover_size(width: int, height: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Smallest (w, h) with the source aspect that covers (out_w, out_h)."""
    scale = max(out_w / width, out_h / height)
    return max(out_w, round(width * scale)), max(out_h, round(height * scale))


def _center_crop(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (h - out_h) // 2, (w - out_w) // 2
    return img[top:top + out_h, left:left + out_w]


def decode_window(source: bytes | str | os.PathLike, start: float, num_frames: int, fps: float,
                  size: int | tuple[int, int] | None = None, audio_rate: int | None = 16000,
                  short_side: int | None = None, next_frames: bool = False, max_pixels: int = MAX_PIXELS) -> Clip:
    """Decode `num_frames` frames at `fps` from `start` seconds, and the audio of that window.

    Frame i is the last source frame shown at time start + i / fps (frames past the end repeat
    the last frame). `size` resizes (aspect kept, centre crop) to (H, W); an int means square;
    `short_side` instead resizes, aspect kept, without cropping (augmentation crops later).
    Frames come out upright (rotation metadata applied). With `next_frames`, `Clip.next_frames`
    holds the source frame decoded right after each picked frame (consecutive frames, for motion).
    Audio covers [start, start + num_frames / fps) exactly: round(duration * audio_rate) samples,
    zero-padded where the file's audio is shorter.
    A frame larger than `max_pixels` (read from the stream header) raises DecodeError before decoding.
    """
    if num_frames < 1 or fps <= 0:
        raise ValueError(f"need num_frames >= 1 and fps > 0, got {num_frames}, {fps}")
    out_size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
    window = num_frames / fps
    end = start + window
    times = frame_times(start, num_frames, fps)
    with _open(source) as container:
        if not container.streams.video:
            raise DecodeError("no video stream")
        vs = container.streams.video[0]
        _check_frame_size(vs.codec_context.width or 0, vs.codec_context.height or 0, max_pixels)
        frames, following = _decode_video(container, vs, times, out_size, short_side, next_frames, max_pixels)
        audio = None
        if audio_rate and container.streams.audio:
            audio = _decode_audio(container, container.streams.audio[0], start, end, audio_rate)
    return Clip(frames=frames, audio=audio, start=float(start), end=float(end), next_frames=following)


def _decode_video(container, vs, times: np.ndarray, out_size, short_side, with_next: bool = False,
                  max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, np.ndarray | None]:
    tb = vs.time_base
    first_pts = vs.start_time or 0
    try:
        container.seek(max(0, int(times[0] / tb) + first_pts), stream=vs, backward=True, any_frame=False)
    except av.error.FFmpegError as e:  # a raw stream (no container index) cannot seek; the demuxer is then spent
        raise DecodeError(f"video stream cannot seek ({_short(e)}): not a seekable container (a raw stream?)") from None
    picked: list[np.ndarray | None] = [None] * len(times)
    following: list[np.ndarray | None] = [None] * len(times)  # with_next: the frame decoded after each pick
    last, last_array = None, None  # the newest decoded frame; converted only if a time picks it

    def convert(frame) -> np.ndarray:
        return to_upright_rgb(frame, out_size, short_side)

    i = 0
    try:
        for frame in container.decode(vs):
            # the header may give no size (0x0) or a stream may grow mid-way: every frame is checked, so
            # at most one oversized frame is ever held
            _check_decoded_size(frame, max_pixels)
            if frame.pts is None:
                continue
            t = float((frame.pts - first_pts) * tb)
            current = None  # this frame, converted when it follows a picked frame
            # the frame shown at times[i] is the newest frame that starts at or before it
            while i < len(times) and t > times[i] + 1e-6:
                if last is not None and last_array is None:
                    last_array = convert(last)
                picked[i] = last_array
                if with_next:  # the picked frame's successor is the frame decoded now
                    current = convert(frame) if current is None else current
                    following[i] = current
                i += 1
            if i >= len(times):
                break
            last, last_array = frame, current  # converted already when it followed a pick
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
    frames = np.stack([p if p is not None else first for p in picked])
    if not with_next:
        return frames, None
    # past the end of the stream the picked frame has no successor: it follows itself (no motion)
    return frames, np.stack([f if f is not None else p for f, p in zip(following, frames)])


def _decode_audio(container, aus, start: float, end: float, rate: int) -> np.ndarray:
    want = int(round((end - start) * rate))
    out = np.zeros(want, dtype=np.float32)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    tb = aus.time_base
    first_pts = aus.start_time or 0
    # seek a little before the window: audio decoders (AAC, Opus) need a frame of pre-roll after a
    # seek, and the resampler's filter settles; samples before the window are dropped below
    container.seek(max(0, int(max(0.0, start - AUDIO_PREROLL) / tb) + first_pts), stream=aus, backward=True,
                   any_frame=False)
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


def decode_audio(source: bytes | str | os.PathLike, start: float, seconds: float, rate: int = 16000) -> np.ndarray:
    """(round(seconds * rate),) float32 mono of [start, start + seconds) from any file with an audio
    track, video or not (a search query may be a .wav or .mp3); zero-padded past the audio's end."""
    with _open(source) as container:
        if not container.streams.audio:
            raise DecodeError("no audio stream")
        return _decode_audio(container, container.streams.audio[0], start, start + seconds, rate)


def _check_decoded_size(frame, max_pixels: int) -> None:
    """The header's size is checked before decoding; a stream may still switch to a larger frame
    later (a new H.264 sequence header), so each decoded frame is checked too: at most one frame
    over the limit is ever held."""
    if frame.width * frame.height > max_pixels:
        raise DecodeError(f"frame size {frame.width}x{frame.height} exceeds the limit of {max_pixels} pixels")


def decode_all(source: bytes | str | os.PathLike, size: int | tuple[int, int] | None = None,
               audio_rate: int | None = 16000,
               max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Every frame of the video, upright: (frames (N, H, W, 3) uint8, their times (N,) in seconds,
    the whole audio track mono at `audio_rate` or None). For verification and as the naive
    baseline of the benchmark; training never needs the whole video. A frame larger than
    `max_pixels` raises DecodeError: from the stream header before anything is decoded, as in
    decode_window, and on each decoded frame (a stream may switch to a larger size later)."""
    out_size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
    frames, times = [], []
    with _open(source) as container:
        if not container.streams.video:
            raise DecodeError("no video stream")
        vs = container.streams.video[0]
        _check_frame_size(vs.codec_context.width or 0, vs.codec_context.height or 0, max_pixels)
        first_pts = vs.start_time or 0
        try:
            for frame in container.decode(vs):
                _check_decoded_size(frame, max_pixels)
                if frame.pts is not None:
                    frames.append(to_upright_rgb(frame, out_size))
                    times.append(float((frame.pts - first_pts) * vs.time_base))
        except (av.error.FFmpegError, ValueError) as e:
            raise DecodeError(f"corrupt video stream ({_short(e)})") from None
        if not frames:
            raise DecodeError("video stream has no decodable frame")
        audio = None
        if audio_rate and container.streams.audio:  # sample i at stream time i / audio_rate, as in windows
            aus = container.streams.audio[0]
            length = _stream_duration(aus, container) or (times[-1] + 1.0)
            audio = _decode_audio(container, aus, 0.0, length, audio_rate)
    return np.stack(frames), np.asarray(times), audio


def check_video_stream(source: bytes | str | os.PathLike, duration: float, min_fraction: float = 0.9,
                       max_pixels: int = MAX_PIXELS) -> None:
    """Decode every video packet (no colour conversion) and raise DecodeError when the stream is
    corrupt or ends well before its declared duration (a truncated download), or when a frame is
    larger than `max_pixels` (from the stream header before decoding, then on every frame)."""
    last = 0.0
    with _open(source) as container:
        if not container.streams.video:
            raise DecodeError("no video stream")
        vs = container.streams.video[0]
        _check_frame_size(vs.codec_context.width or 0, vs.codec_context.height or 0, max_pixels)
        first_pts = vs.start_time or 0
        try:
            for frame in container.decode(vs):
                _check_decoded_size(frame, max_pixels)
                if frame.pts is not None:
                    last = max(last, float((frame.pts - first_pts) * vs.time_base))
        except (av.error.FFmpegError, ValueError) as e:
            raise DecodeError(f"corrupt or truncated video stream after {last:.1f}s ({_short(e)})") from None
    frame_time = 1.0 / float(vs.average_rate or 25)
    if last + frame_time < min_fraction * duration:
        raise DecodeError(f"truncated: video decodes to {last + frame_time:.1f}s of the declared {duration:.1f}s")
