"""Audio-only releases (ESC-50's WAV clips) as MP4 files `shards build` accepts: the audio
re-encoded as AAC beside a still black picture (4 frames per second, 32 x 32), written with PyAV,
so no FFmpeg command line is needed. Audio models read the audio track; the picture is a carrier."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np

from ...fsio import commit_file, inside, outside_reason
from ..decode import DecodeError, decode_audio
from ..synth import write_mp4

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".m4a"}


def wrap_audio(source: Path, target: Path, rate: int = 44100, fps: int = 4, size: int = 32) -> float:
    """Write `target` (.mp4): the audio of `source` at `rate` Hz mono and a black picture; its seconds."""
    try:
        with av.open(str(source)) as container:
            if not container.streams.audio:
                raise DecodeError("no audio stream")
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration:
                seconds = container.duration / av.time_base
            else:
                raise DecodeError("unknown duration")
    except av.error.FFmpegError as e:
        raise DecodeError(f"unreadable audio ({type(e).__name__})") from None
    if seconds <= 0:
        raise DecodeError("empty audio")
    audio = decode_audio(source, 0.0, seconds, rate)
    frames = np.zeros((max(1, math.ceil(seconds * fps)), size, size, 3), dtype=np.uint8)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp_{target.name}")
    write_mp4(tmp, frames, audio, fps, rate)
    commit_file(tmp, target)
    return seconds


def wrap_audio_folder(source_dir: str | Path, out_dir: str | Path, rate: int = 44100) -> dict:
    """Every audio file under `source_dir` -> `out_dir/<same relative path>.mp4`; files already
    written are kept (re-running resumes); unreadable ones are listed with the reason."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    files = sorted(p for p in source_dir.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    done, skipped, failed = 0, 0, []
    for path in files:
        target = out_dir / path.relative_to(source_dir).with_suffix(".mp4")
        if target.is_file():
            skipped += 1
            continue
        try:
            wrap_audio(path, target, rate)
            done += 1
        except (DecodeError, OSError) as e:
            failed.append({"file": str(path.relative_to(source_dir)), "reason": str(e)})
    return {"found": len(files), "written": done, "already_there": skipped, "failed": failed}


def cut_clip(source: Path, target: Path, start: float, end: float, fps: int = 30, short_side: int = 256,
             audio_rate: int = 48000) -> None:
    """Re-encode [start, end) of `source` into `target` (.mp4): `fps` frames per second, the short
    side resized to `short_side`, mono audio at `audio_rate`. Decoding seeks to the keyframe before
    `start`, so a clip costs its own length, not the video's."""
    from ..decode import decode_window
    num_frames = max(1, round((end - start) * fps))
    clip = decode_window(source, start, num_frames, float(fps), short_side=short_side, audio_rate=audio_rate)
    frames = clip.frames[:, : clip.frames.shape[1] // 2 * 2, : clip.frames.shape[2] // 2 * 2]  # H.264 4:2:0: even sizes
    audio = clip.audio if clip.audio is not None else np.zeros(round(num_frames / fps * audio_rate), np.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp_{target.name}")
    write_mp4(tmp, np.ascontiguousarray(frames), audio.astype(np.float32), fps, audio_rate)
    commit_file(tmp, target)


def cut_clips(captions: str | Path, videos_dir: str | Path, out_dir: str | Path, fps: int = 30,
              short_side: int = 256, audio_rate: int = 48000) -> dict:
    """Cut every entry of a converted captions.jsonl that names a `clip` [start, end] of a
    `source_video` (EK-100 MIR) out of `videos_dir/<source_video>` into `out_dir/<video>`;
    clips already cut are kept (re-running resumes); failures are listed with their line. Both
    paths must stay inside their folder (fsio.inside: no absolute path elsewhere, no `..`, no
    symlink out): an entry that leaves one is a failure, nothing is read or written for it."""
    import json
    captions, videos_dir, out_dir = Path(captions), Path(videos_dir), Path(out_dir)
    done, skipped, failed, total = 0, 0, [], 0
    for line_no, line in enumerate(captions.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as e:
            entry = {"clip": [], "source_video": None, "_error": f"malformed JSON ({e.msg})"}
        if not isinstance(entry, dict) or not isinstance(entry.get("clip"), list) or "source_video" not in entry:
            continue
        total += 1
        video, source_video = entry.get("video"), entry["source_video"]
        if "_error" in entry or not (isinstance(video, str) and video and isinstance(source_video, str) and source_video):
            reason = entry.get("_error", "'video' and 'source_video' must be non-empty paths")
            failed.append({"line": line_no, "id": entry.get("id"), "reason": reason})
            continue
        target, source = inside(out_dir, video), inside(videos_dir, source_video)
        if target is None or source is None:
            reason = (f"video: {outside_reason(out_dir, video)}" if target is None
                      else f"source_video: {outside_reason(videos_dir, source_video)}")
            failed.append({"line": line_no, "id": entry.get("id"), "reason": f"refused, {reason}"})
            continue
        if target.is_file():
            skipped += 1
            continue
        try:
            if not source.is_file():
                raise DecodeError(f"source video not found: {source}")
            cut_clip(source, target, float(entry["clip"][0]), float(entry["clip"][1]), fps, short_side, audio_rate)
            done += 1
        except (DecodeError, OSError, ValueError, av.error.FFmpegError) as e:
            failed.append({"line": line_no, "id": entry.get("id"), "reason": str(e)})
        except (IndexError, TypeError, OverflowError):
            failed.append({"line": line_no, "id": entry.get("id"), "reason": f"clip {entry['clip']!r} is not "
                                                                          f"[start, end] in finite seconds"})
    return {"clips": total, "written": done, "already_there": skipped, "failed": failed}
