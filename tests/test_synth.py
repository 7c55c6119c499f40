"""Tests for the procedural demo dataset: files, streams, determinism and real cross-modal content."""
import json

import av
import numpy as np
import pytest

from mmvssl.data import synth

SECONDS = 2.0
SAMPLE_RATE = 16000
FPS = 10
SIZE = 96
KEYS = {"video", "caption", "narrations", "label", "color", "shape", "motion"}


def _build(root, seed=0):
    return synth.make_synthetic_dataset(root, seed=seed, num_train=6, num_val=5, size=SIZE, fps=FPS,
                                        seconds=SECONDS, sample_rate=SAMPLE_RATE)


def _records(split_dir):
    return [json.loads(line) for line in (split_dir / "captions.jsonl").read_text().splitlines()]


def _decode(path):
    """Return (frames uint8 (T, H, W, 3), mono audio float32, video codec name, audio codec name)."""
    with av.open(str(path)) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
        codecs = container.streams.video[0].codec_context.name, container.streams.audio[0].codec_context.name
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    return frames, audio, *codecs


def _object_pixels(frame):
    return frame.max(axis=-1) > 128  # the background is dark, the object saturated


def _nearest_color(rgb):
    names = list(synth.COLORS)
    palette = np.array([synth.COLORS[n] for n in names], dtype=float)
    similarity = palette @ rgb / (np.linalg.norm(palette, axis=1) * np.linalg.norm(rgb))
    return names[int(np.argmax(similarity))]


def _dominant_hz(audio):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return np.fft.rfftfreq(audio.size, 1 / SAMPLE_RATE)[np.argmax(spectrum)]


def _single_clip(tmp_path, shape, color, motion, seed=0):
    rng = np.random.default_rng(seed)
    position, hits = synth.trajectory(motion, rng, SECONDS)
    frames = synth.render_video(shape, color, position, rng, SIZE, FPS, SECONDS)
    audio = synth.render_audio(shape, color, motion, position, hits, rng, SAMPLE_RATE, SECONDS)
    path = tmp_path / f"{shape}_{color}_{motion}.mp4"
    synth.write_mp4(path, frames, audio, FPS, SAMPLE_RATE)
    return _decode(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, _build(root)


def test_files_schema_and_labels(dataset):
    root, summary = dataset
    assert summary["train"]["num_clips"] == 6 and summary["val"]["num_clips"] == 5
    classes = (root / "val" / "classes.txt").read_text().split()
    assert classes == list(synth.SHAPES)
    for split, count in (("train", 6), ("val", 5)):
        records = _records(root / split)
        assert len(records) == count
        assert sorted(p.name for p in (root / split / "videos").glob("*.mp4")) == \
            [f"{split}_{i:06d}.mp4" for i in range(count)]
        for record in records:
            assert set(record) == KEYS
            assert (root / split / record["video"]).is_file()
            assert record["label"] == record["shape"] and record["label"] in classes
            assert record["color"] in record["caption"] and record["shape"] in record["caption"]
            narrations = record["narrations"]
            assert 2 <= len(narrations) <= 3
            assert narrations[0]["start"] == 0.0 and narrations[-1]["end"] == SECONDS
            assert all(a["end"] == b["start"] for a, b in zip(narrations, narrations[1:]))
            assert len({n["text"] for n in narrations}) == len(narrations)
            assert all(record["shape"] in n["text"] and n["text"] == n["text"].lower() for n in narrations)
    val_combos = [(r["shape"], r["color"], r["motion"]) for r in _records(root / "val")]
    assert len(set(val_combos)) == len(val_combos)


def test_clips_decode_with_expected_streams_and_colour(dataset):
    root, _ = dataset
    for split in ("train", "val"):
        for record in _records(root / split):
            frames, audio, video_codec, audio_codec = _decode(root / split / record["video"])
            assert (video_codec, audio_codec) == ("h264", "aac")
            assert frames.shape == (int(SECONDS * FPS), SIZE, SIZE, 3)
            assert abs(audio.size / SAMPLE_RATE - SECONDS) < 0.15
            mask = _object_pixels(frames)
            assert mask.mean() > 0.01, "object should be visible"
            assert _nearest_color(frames[mask].mean(axis=0)) == record["color"]
            if record["shape"] == "circle":  # pure tone: the pitch gives away the colour
                assert abs(_dominant_hz(audio) / synth.PITCH_HZ[record["color"]] - 1) < 0.05


def test_same_seed_is_deterministic_and_other_seed_differs(dataset, tmp_path):
    root, _ = dataset
    _build(tmp_path / "again", seed=0)
    _build(tmp_path / "other", seed=1)
    for split in ("train", "val"):
        first = (root / split / "captions.jsonl").read_bytes()
        assert (tmp_path / "again" / split / "captions.jsonl").read_bytes() == first
        assert (tmp_path / "other" / split / "captions.jsonl").read_bytes() != first
    clip = _records(root / "val")[0]["video"]
    # exact: the same seed, renderer and encoder settings in one process (x264 is deterministic)
    assert np.array_equal(_decode(root / "val" / clip)[0][0], _decode(tmp_path / "again" / "val" / clip)[0][0])
    assert (root / "val" / clip).read_bytes() == (tmp_path / "again" / "val" / clip).read_bytes()


def test_too_many_val_clips_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        synth.make_synthetic_dataset(tmp_path, num_train=0, num_val=len(synth.COMBOS) + 1)


@pytest.mark.parametrize("color", list(synth.COLORS))
def test_circle_pitch_follows_colour(tmp_path, color):
    frames, audio, _, _ = _single_clip(tmp_path, "circle", color, "circling")
    assert abs(_dominant_hz(audio) / synth.PITCH_HZ[color] - 1) < 0.05
    assert _nearest_color(frames[_object_pixels(frames)].mean(axis=0)) == color


def test_left_to_right_moves_right_and_gets_louder(tmp_path):
    frames, audio, _, _ = _single_clip(tmp_path, "square", "green", "left_to_right")
    xs = np.arange(SIZE)
    centroid_x = np.array([xs[np.nonzero(_object_pixels(frame))[1]].mean() for frame in frames])
    assert np.all(np.diff(centroid_x) > -1.0) and centroid_x[-1] - centroid_x[0] > SIZE / 3
    quarter = audio.size // 4
    assert np.sqrt(np.mean(audio[-quarter:] ** 2)) > 1.5 * np.sqrt(np.mean(audio[:quarter] ** 2))


def test_up_and_down_is_louder_when_high(tmp_path):
    frames, audio, _, _ = _single_clip(tmp_path, "triangle", "blue", "up_and_down", seed=3)
    ys = np.arange(SIZE)
    height = -np.array([ys[np.nonzero(_object_pixels(frame))[0]].mean() for frame in frames])
    assert height.max() - height.min() > SIZE / 4
    per_frame = audio[: frames.shape[0] * (SAMPLE_RATE // FPS)].reshape(frames.shape[0], -1)
    loudness = np.sqrt(np.mean(per_frame ** 2, axis=1))
    assert np.corrcoef(height, loudness)[0, 1] > 0.8


def test_each_shape_has_its_own_timbre(tmp_path):
    """Same colour (400 Hz), each shape: the decoded audio shows the sound type its shape implies."""
    pitch = synth.PITCH_HZ["green"]
    audio = {shape: _single_clip(tmp_path, shape, "green", "circling")[1] for shape in synth.SHAPES}
    freqs = np.fft.rfftfreq(audio["circle"].size, 1 / SAMPLE_RATE)

    def share(shape, lo, hi):  # fraction of the clip's energy between lo*pitch and hi*pitch
        power = np.abs(np.fft.rfft(audio[shape])) ** 2
        return power[(freqs >= lo * pitch) & (freqs <= hi * pitch)].sum() / power.sum()

    assert share("circle", 0.97, 1.03) > 0.8  # pure tone
    assert share("circle", 2.9, 3.1) < 0.01 < 0.05 < share("square", 2.9, 3.1)  # odd harmonics
    assert share("ring", 0.97, 1.03) > 0.25 and share("ring", 1.22, 1.30) > 0.25  # two notes
    assert share("cross", 0.85, 1.18) > 0.7 and share("cross", 0.99, 1.01) < 0.3  # band of noise, not a tone
    window, hop = 512, 128  # rising whistle: the peak frequency climbs through each half-second sweep
    starts = np.arange(0, SAMPLE_RATE // 2 - window, hop)
    window_freqs = np.fft.rfftfreq(window, 1 / SAMPLE_RATE)
    peaks = [window_freqs[np.argmax(np.abs(np.fft.rfft(audio["triangle"][s:s + window])))] for s in starts]
    assert np.corrcoef(starts, peaks)[0, 1] > 0.9
