"""Procedural audio-visual demo dataset with real cross-modal structure.

Every clip shows one object = (shape, colour, motion) on a dark, per-clip noise
texture with a slowly drifting gradient; object size, speed, phase and start
position vary per clip, so a model cannot memorise pixels. The object makes its
own sound: the shape picks the sound type (sine hum, buzz, rising whistle,
crackling noise bursts, two-note chime), the colour picks the pitch, and the
motion shapes the loudness in sync with the picture (louder to the right for
left-to-right, louder when high for up-and-down, a steady tremolo when circling,
clicks at each wall hit when bouncing). Captions and timestamped narrations
name colour, shape and motion through varied templates and synonyms.

Clips are H.264 + AAC mp4 files written with PyAV; a split's captions.jsonl holds
one object per clip. Output is deterministic for a seed: every clip draws from
its own child generator ``default_rng([seed, split, index])`` and x264 runs
single-threaded.
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLORS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255),
}
PITCH_HZ = {"red": 250.0, "green": 400.0, "blue": 630.0, "yellow": 1000.0, "magenta": 1600.0, "cyan": 2500.0}
MOTIONS = ("left_to_right", "up_and_down", "circling", "bouncing")
COMBOS = [(s, c, m) for s in SHAPES for c in COLORS for m in MOTIONS]

# motion -> (third-person verb phrases, gerund phrases)
MOTION_PHRASES = {
    "left_to_right": (["moves from left to right", "slides from left to right", "travels across to the right",
                       "drifts from the left side to the right"],
                      ["moving from left to right", "sliding left to right", "going left to right",
                       "crossing over to the right"]),
    "up_and_down": (["moves up and down", "bobs up and down", "rises and falls", "goes up and down"],
                    ["moving up and down", "bobbing up and down", "rising and falling", "going up and down"]),
    "circling": (["circles around", "moves in a circle", "travels in circles", "loops around the middle"],
                 ["circling around", "moving in a circle", "going round in circles", "looping around"]),
    "bouncing": (["bounces diagonally", "bounces off the walls", "zigzags diagonally between the edges",
                  "ricochets around the frame"],
                 ["bouncing diagonally", "bouncing off the walls", "ricocheting from wall to wall",
                  "zigzagging diagonally"]),
}
# shape -> (sound type, participle phrase, noun phrase)
SOUNDS = {
    "circle": ("sine", "humming a steady tone", "a steady hum"),
    "square": ("square", "buzzing harshly", "a harsh buzz"),
    "triangle": ("chirp", "whistling upward", "a rising whistle"),
    "cross": ("noise", "crackling in bursts", "crackling bursts of noise"),
    "ring": ("two_tone", "chiming two notes", "a two-note chime"),
}
CAPTION_TEMPLATES = [
    "a {color} {shape} {verb}",
    "the {color} {shape} {verb}, {sound_ing}",
    "watch a {color} {shape} {gerund}",
    "a {color} {shape} {gerund} with {sound_noun}",
    "video of a {color} {shape} that {verb}",
    "there is a {color} {shape} {gerund}, {sound_ing}",
    "{sound_noun} as a {color} {shape} {verb}",
    "on a dark background, a {color} {shape} {verb}",
]
NARRATION_TEMPLATES = [
    "the {color} {shape} {verb}",
    "a {color} {shape} is {gerund}",
    "the {shape} keeps {gerund}",
    "{color} {shape} {verb}",
    "the {color} {shape} is {sound_ing}",
]


def describe(template: str, shape: str, color: str, motion: str, rng: np.random.Generator) -> str:
    """Render one caption/narration template with randomly chosen synonyms."""
    verbs, gerunds = MOTION_PHRASES[motion]
    _, sound_ing, sound_noun = SOUNDS[shape]
    return template.format(color=color, shape=shape, verb=rng.choice(verbs), gerund=rng.choice(gerunds),
                           sound_ing=sound_ing, sound_noun=sound_noun)


def trajectory(motion: str, rng: np.random.Generator, seconds: float):
    """Return ``position(t) -> (x, y)`` in [0, 1] (fraction of the free range) and the wall-hit times."""
    speed = rng.uniform(0.8, 1.25)
    if motion == "left_to_right":
        start, y = rng.uniform(0.0, 0.15), rng.uniform(0.2, 0.8)
        span = min(rng.uniform(0.65, 0.85) * speed, 1.0 - start)
        return lambda t: (start + span * t / seconds, np.full_like(t, y)), []
    if motion == "up_and_down":
        x, phase, freq = rng.uniform(0.2, 0.8), rng.uniform(0, 2 * np.pi), 0.45 * speed
        return lambda t: (np.full_like(t, x), 0.5 + 0.5 * np.sin(2 * np.pi * freq * t + phase)), []
    if motion == "circling":
        radius, phase = rng.uniform(0.35, 0.5), rng.uniform(0, 2 * np.pi)
        omega = 2 * np.pi * 0.45 * speed * rng.choice([-1.0, 1.0])
        return lambda t: (0.5 + radius * np.cos(omega * t + phase), 0.5 + radius * np.sin(omega * t + phase)), []
    # bouncing: each axis is a triangle wave (reflection off the walls), roughly equal speeds
    offset = rng.uniform(0, 2, size=2)
    velocity = 0.65 * speed * rng.uniform(0.85, 1.15, size=2) * rng.choice([-1.0, 1.0], size=2)

    def position(t):
        folded = np.mod(offset[:, None] + velocity[:, None] * np.asarray(t)[None], 2.0)
        x, y = np.where(folded > 1.0, 2.0 - folded, folded)
        return x, y

    hits = []
    for u, v in zip(offset, velocity):
        lo, hi = sorted((u, u + v * seconds))
        hits += [(k - u) / v for k in range(int(np.floor(lo)) + 1, int(np.ceil(hi)))]
    return position, sorted(hits)


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Boolean mask of ``shape`` for pixel offsets (dx, dy) from its centre."""
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= half ** 2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * half) & (np.abs(dy) <= 0.85 * half)
    if shape == "triangle":  # pointing up: half-width grows from 0 at the top to `half` at the base
        return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    if shape == "cross":
        bar = 0.3 * half
        return ((np.abs(dx) <= bar) & (np.abs(dy) <= half)) | ((np.abs(dy) <= bar) & (np.abs(dx) <= half))
    if shape == "ring":
        radius2 = dx ** 2 + dy ** 2
        return (radius2 <= half ** 2) & (radius2 >= (0.55 * half) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def render_video(shape, color, position, rng, size: int, fps: int, seconds: float) -> np.ndarray:
    """Frames (T, size, size, 3) uint8: the object over a dark noise texture with a drifting gradient."""
    times = np.arange(int(round(seconds * fps))) / fps
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    coarse = np.kron(rng.normal(size=(size // 8 + 1,) * 2), np.ones((8, 8)))[:size, :size]
    texture = rng.uniform(15, 35) + rng.uniform(3, 8) * coarse + rng.uniform(1, 4) * rng.normal(size=(size, size))
    tint = rng.uniform(-5, 5, size=3)
    angle, waves, drift = rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 1.0), rng.uniform(0.05, 0.2)
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys) / size * waves
    gradient = 0.5 + 0.5 * np.sin(2 * np.pi * (ramp[None] + drift * times[:, None, None]))
    background = texture[None] + rng.uniform(5, 15) * gradient
    frames = background[..., None] + tint

    half = rng.uniform(0.18, 0.28) * size / 2
    margin = half / size + 0.03
    fx, fy = position(times)
    cx, cy = (margin + (1 - 2 * margin) * fx) * size, (margin + (1 - 2 * margin) * fy) * size
    mask = shape_mask(shape, xs[None] - cx[:, None, None], ys[None] - cy[:, None, None], half)
    frames[mask] = np.array(COLORS[color]) * rng.uniform(0.8, 1.0)
    return np.clip(frames, 0, 255).astype(np.uint8)


def render_audio(shape, color, motion, position, hits, rng, sample_rate: int, seconds: float) -> np.ndarray:
    """Mono float32 waveform: shape -> timbre, colour -> pitch, motion -> synchronised loudness."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    pitch, sound = PITCH_HZ[color], SOUNDS[shape][0]
    phase0 = rng.uniform(0, 2 * np.pi)
    if sound == "sine":
        wave = np.sin(2 * np.pi * pitch * t + phase0)
    elif sound == "square":  # band-limited: odd harmonics below Nyquist
        ks = [k for k in range(1, 40, 2) if k * pitch < 0.475 * sample_rate]
        wave = sum(np.sin(k * (2 * np.pi * pitch * t + phase0)) / k for k in ks) * 4 / np.pi
    elif sound in ("chirp", "two_tone"):
        cycle = np.mod(t, 0.5) / 0.5
        freq = pitch * (0.8 + 0.45 * cycle if sound == "chirp" else np.where(cycle < 0.5, 1.0, 1.26))
        wave = np.sin(np.cumsum(2 * np.pi * freq / sample_rate) + phase0)
    else:  # noise bursts band-passed around the pitch, 4 bursts per second
        spectrum = np.fft.rfft(rng.normal(size=t.size))
        band = np.fft.rfftfreq(t.size, 1 / sample_rate)
        spectrum[(band < 0.85 * pitch) | (band > 1.18 * pitch)] = 0
        wave = np.fft.irfft(spectrum, n=t.size)
        wave *= (np.mod(t * 4 + rng.uniform(), 1.0) < 0.5) / (np.abs(wave).max() + 1e-9)

    x, y = position(t)
    if motion == "left_to_right":
        envelope = 0.2 + 0.8 * x
    elif motion == "up_and_down":
        envelope = 0.2 + 0.8 * (1 - y)  # image y grows downwards: louder when high
    elif motion == "circling":
        envelope = 0.65 + 0.35 * np.sin(2 * np.pi * 6.0 * t)
    else:
        envelope = np.full_like(t, 0.3)
    signal = wave * envelope
    for hit in hits:  # wall hits: a loud decaying click plus a burst of the tone
        after = t >= hit
        decay = np.exp(-(t[after] - hit) / 0.04)
        signal[after] += decay * (wave[after] + 0.8 * rng.normal(size=after.sum()) * (decay > 0.7))
    signal += rng.uniform(0.005, 0.02) * rng.normal(size=t.size)
    return (0.5 * signal / np.abs(signal).max()).astype(np.float32)


def write_mp4(path, frames: np.ndarray, audio: np.ndarray, fps: int, sample_rate: int) -> None:
    """Encode frames (H.264, yuv420p, keyframe every 2 s) and mono audio (AAC) into an mp4 with PyAV."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.codec_context.gop_size = 2 * fps
        # single-threaded and asm=0: with SIMD on, x264 output here varied from run to run for identical frames
        x264_params = f"keyint={2 * fps}:scenecut=0:asm=0"
        video.options = {"threads": "1", "preset": "veryfast", "x264-params": x264_params}
        sound = container.add_stream("aac", rate=sample_rate, layout="mono")
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode())
        chunk = sound.codec_context.frame_size or 1024
        for start in range(0, audio.size, chunk):
            samples = np.ascontiguousarray(audio[None, start:start + chunk])
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
            container.mux(sound.encode(frame))
        container.mux(sound.encode())


def check_mp4(path, seconds: float, tolerance: float = 0.15) -> None:
    """Raise if the file lacks a video or audio stream or either lasts noticeably more or less than ``seconds``."""
    with av.open(str(path)) as container:
        for stream in (container.streams.video[0], container.streams.audio[0]):
            duration = float(stream.duration * stream.time_base)
            if abs(duration - seconds) > tolerance:
                raise RuntimeError(f"{path}: {stream.type} lasts {duration:.3f}s, expected {seconds:.3f}s")


def write_split(split_dir: Path, split: str, combos, seed: int, split_id: int, size: int, fps: int,
                seconds: float, sample_rate: int) -> Path:
    """Render, encode and caption one clip per combo; returns the captions.jsonl path."""
    videos = split_dir / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for stale in videos.glob(f"{split}_*.mp4"):
        stale.unlink()
    records = []
    for index, (shape, color, motion) in enumerate(combos):
        rng = np.random.default_rng([seed, split_id, index])
        position, hits = trajectory(motion, rng, seconds)
        frames = render_video(shape, color, position, rng, size, fps, seconds)
        audio = render_audio(shape, color, motion, position, hits, rng, sample_rate, seconds)
        name = f"videos/{split}_{index:06d}.mp4"
        write_mp4(split_dir / name, frames, audio, fps, sample_rate)
        check_mp4(split_dir / name, seconds)
        bounds = np.linspace(0, seconds, rng.integers(2, 4) + 1).round(3)
        templates = rng.choice(NARRATION_TEMPLATES, size=len(bounds) - 1, replace=False)
        narrations = [{"start": float(s), "end": float(e), "text": describe(tpl, shape, color, motion, rng)}
                      for s, e, tpl in zip(bounds[:-1], bounds[1:], templates)]
        caption = describe(rng.choice(CAPTION_TEMPLATES), shape, color, motion, rng)
        records.append({"video": name, "caption": caption, "narrations": narrations, "label": shape,
                        "color": color, "shape": shape, "motion": motion})
    captions = split_dir / "captions.jsonl"
    captions.write_text("".join(json.dumps(record) + "\n" for record in records))
    return captions


def make_synthetic_dataset(out_dir, seed: int = 0, num_train: int = 384, num_val: int = 120, size: int = 96,
                           fps: int = 10, seconds: float = 4.0, sample_rate: int = 16000) -> dict:
    """Write the train/val demo dataset under ``out_dir`` and return a summary of what was written.

    Train combos are uniform over all 120 (shape, colour, motion) combos; val combos are pairwise distinct.
    """
    if num_val > len(COMBOS):
        raise ValueError(f"num_val={num_val} exceeds the {len(COMBOS)} distinct (shape, colour, motion) combos")
    out_dir = Path(out_dir)
    summary = {"out_dir": str(out_dir), "seed": seed, "size": size, "fps": fps, "seconds": seconds,
               "sample_rate": sample_rate}
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        rng = np.random.default_rng([seed, split_id])
        picks = rng.integers(len(COMBOS), size=count) if split == "train" else \
            rng.choice(len(COMBOS), size=count, replace=False)
        split_dir = out_dir / split
        captions = write_split(split_dir, split, [COMBOS[i] for i in picks], seed, split_id, size, fps,
                               seconds, sample_rate)
        summary[split] = {"dir": str(split_dir), "captions": str(captions), "num_clips": count}
    classes = out_dir / "val" / "classes.txt"
    classes.write_text("\n".join(SHAPES) + "\n")
    summary["val"]["classes"] = str(classes)
    return summary
