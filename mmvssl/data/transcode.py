"""Optional re-encoding during `shards build`: smaller frames, a fixed frame rate, long videos
cut into consecutive clips.

One streaming pass over the source (frames and audio are never all in memory, so an hour-long
video costs what one clip costs): frames are turned upright and resized during conversion,
picked at the target rate, and written as H.264 (keyframe every 2 s, so the loader's seeks stay
short) with the audio re-encoded as AAC at its own rate and channel count (more than two
channels are downmixed to stereo; the metadata says so).
"""

from __future__ import annotations

import io
from fractions import Fraction
from dataclasses import dataclass, field

import av
import numpy as np

from .decode import DecodeError, _open, _short, to_upright_rgb


@dataclass
class TranscodeOptions:
    short_side: int | None = None  # resize so the shorter side has this many pixels
    fps: float | None = None  # constant output frame rate (default: the source's average rate)
    max_seconds: float | None = None  # cut longer videos into consecutive clips of this length

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.short_side, self.fps, self.max_seconds))


@dataclass
class _ClipWriter:
    start: float
    end: float
    buffer: io.BytesIO = field(default_factory=io.BytesIO)
    container: object = None
    video: object = None
    audio: object = None
    frames: int = 0
    samples: int = 0


@dataclass
class EncodedClip:
    data: bytes
    start: float  # seconds into the source
    end: float


def transcode(source: bytes, options: TranscodeOptions, duration: float) -> list[EncodedClip]:
    """Re-encode `source` per `options`; one clip, or consecutive clips of max_seconds."""
    with _open(source) as container:
        vs = container.streams.video[0]
        aus = container.streams.audio[0] if container.streams.audio else None
        fps = float(options.fps or vs.average_rate or vs.guessed_rate or 25.0)
        span = options.max_seconds or max(duration, 1e-3)
        bounds = [(i * span, min(duration, (i + 1) * span)) for i in range(max(1, int(np.ceil(duration / span - 1e-6))))]
        audio_layout = None
        resampler = None
        if aus is not None:
            channels = aus.codec_context.channels or 1
            audio_layout = "mono" if channels == 1 else "stereo"
            resampler = av.AudioResampler(format="fltp", layout=audio_layout, rate=aus.codec_context.sample_rate)
        writers: dict[int, _ClipWriter] = {}
        done: list[EncodedClip] = []

        closed: set[int] = set()

        def writer(i: int, dims: tuple[int, int]) -> _ClipWriter | None:
            if i in closed:
                return None  # late audio of a finished clip
            if i not in writers:
                w = _ClipWriter(*bounds[i])
                w.container = av.open(w.buffer, "w", format="mp4")
                w.video = w.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                w.video.height, w.video.width = dims
                w.video.pix_fmt = "yuv420p"
                w.video.gop_size = max(1, int(round(2 * fps)))
                w.video.options = {"preset": "veryfast", "crf": "20"}
                if aus is not None:
                    w.audio = w.container.add_stream("aac", rate=aus.codec_context.sample_rate)
                    w.audio.layout = audio_layout
                writers[i] = w
            return writers[i]

        def clip_of(t: float) -> int:
            return min(len(bounds) - 1, max(0, int(t // span)))

        first_v, first_a = vs.start_time or 0, (aus.start_time or 0) if aus is not None else 0
        try:  # the output frame size, known before any audio has to be written
            dims = _even(to_upright_rgb(next(container.decode(vs)), short_side=options.short_side)).shape[:2]
            container.seek(0)
        except (StopIteration, av.error.FFmpegError, ValueError) as e:
            raise DecodeError(f"re-encoding failed ({_short(e) if isinstance(e, Exception) else e})") from None
        video_clip = audio_clip = 0
        last_img = None
        streams = [vs] + ([aus] if aus is not None else [])
        try:
            for packet in container.demux(*streams):
                for frame in packet.decode():
                    if frame.pts is None:
                        continue
                    if packet.stream.type == "video":
                        t = float((frame.pts - first_v) * vs.time_base)
                        img = _even(to_upright_rgb(frame, short_side=options.short_side))
                        if img.shape[:2] != dims:  # a mid-stream size change: keep the first size
                            img = _even(to_upright_rgb(frame, size=dims))
                        for j in range(video_clip, clip_of(t) + 1):
                            _emit_until(writer(j, dims), min(t, bounds[j][1]), last_img if last_img is not None else img, fps)
                        video_clip, last_img = clip_of(t), img
                    else:
                        t = float((frame.pts - first_a) * aus.time_base)
                        for rf in resampler.resample(frame):
                            audio_clip = _write_audio(lambda j: writer(j, dims), bounds, span, t, rf)
                            t += rf.samples / rf.sample_rate
                _close_finished(writers, min(video_clip, audio_clip if aus is not None else video_clip), done, last_img,
                                closed)
            if last_img is None:
                raise DecodeError("re-encoding found no video frame")
            for j in range(video_clip, len(bounds)):  # hold the last frame to the end of each clip
                _emit_until(writer(j, dims), bounds[j][1], last_img, fps)
            _close_finished(writers, len(bounds), done, last_img, closed)
        except (av.error.FFmpegError, ValueError) as e:
            for w in writers.values():
                w.container.close()
            raise DecodeError(f"re-encoding failed ({_short(e)})") from None
    if not done:
        raise DecodeError("re-encoding produced no frames")
    return done


def _even(img: np.ndarray) -> np.ndarray:
    return img[: max(2, img.shape[0] // 2 * 2), : max(2, img.shape[1] // 2 * 2)]  # H.264 4:2:0 wants even sizes


def _emit_until(w: _ClipWriter, t: float, img: np.ndarray, fps: float) -> None:
    """Emit the clip's constant-rate output frames whose times lie before t, showing `img`
    (the newest source frame at or before those times)."""
    while w.start + w.frames / fps < t - 1e-9:
        _encode_image(w, img)


def _encode_image(w: _ClipWriter, img: np.ndarray) -> None:
    frame = av.VideoFrame.from_ndarray(img, format="rgb24")
    frame.pts = w.frames
    for packet in w.video.encode(frame):
        w.container.mux(packet)
    w.frames += 1


def _write_audio(writer, bounds, span, t: float, rf) -> int:
    """Route a resampled audio frame (starting at t) into the clips it overlaps; the last clip."""
    data = rf.to_ndarray()  # (channels, n) float planar
    rate, n, pos, clip = rf.sample_rate, rf.samples, 0, 0
    while pos < n:
        now = t + pos / rate
        clip = min(len(bounds) - 1, max(0, int(now // span)))
        w = writer(clip)
        if w is None:
            pos += min(n - pos, max(1, int(round((bounds[clip][1] - now) * rate))))
            continue
        last = clip == len(bounds) - 1
        take = n - pos if last else min(n - pos, max(1, int(round((w.end - now) * rate))))
        if now < 0:  # audio that starts before the video: dropped
            take = min(n - pos, max(1, int(round(-now * rate))))
            pos += take
            continue
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, pos:pos + take]), format="fltp",
                                           layout=rf.layout.name)
        frame.sample_rate, frame.pts = rate, w.samples
        for packet in w.audio.encode(frame):
            w.container.mux(packet)
        w.samples += take
        pos += take
    return clip


def _close_finished(writers, below: int, done: list, last_img, closed: set) -> None:
    for i in sorted(k for k in writers if k < below):
        w = writers.pop(i)
        closed.add(i)
        if w.frames == 0 and last_img is not None:
            _encode_image(w, last_img)
        for stream in (w.video, w.audio):
            if stream is not None:
                for packet in stream.encode():
                    w.container.mux(packet)
        w.container.close()
        done.append(EncodedClip(w.buffer.getvalue(), w.start, w.end))
    done.sort(key=lambda c: c.start)
