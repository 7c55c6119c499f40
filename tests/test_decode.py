import numpy as np
import pytest

from mmvssl.data.decode import DecodeError, decode_window, probe


def dominant_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return spectrum.argmax() * rate / len(wave)


def test_probe_reports_what_is_there(tmp_path, video_factory):
    info = probe(video_factory(tmp_path / "a.mp4", seconds=3.0, size=(96, 80)))
    assert (info.width, info.height, info.fps) == (96, 80, 10.0)
    assert info.duration == pytest.approx(3.0, abs=0.15)
    assert info.has_audio and info.sample_rate == 16000 and info.audio_channels == 1
    silent = probe(video_factory(tmp_path / "b.mp4", audio_rate=None))
    assert not silent.has_audio and silent.sample_rate is None


def test_window_decodes_the_right_frames_and_audio(tmp_path, video_factory):
    path = video_factory(tmp_path / "a.mp4", seconds=4.0, fps=10, tone_hz=440.0)
    clip = decode_window(path.read_bytes(), start=1.0, num_frames=8, fps=4.0, size=32, audio_rate=16000)
    assert clip.frames.shape == (8, 32, 32, 3) and clip.frames.dtype == np.uint8
    # frame shown at t = 1.0 + i / 4 is source frame 10 + 2.5 i (floor); red = 255 * index / 40
    expected = [255 * int(10 + 2.5 * i) / 40 for i in range(8)]
    assert np.allclose(clip.frames[:, 16, 16, 0], expected, atol=6)
    assert clip.audio.shape == (32000,)
    assert dominant_hz(clip.audio, 16000) == pytest.approx(440.0, abs=2.0)
    assert 0.4 < np.abs(clip.audio).max() < 0.6


def test_window_past_the_end_holds_the_last_frame_and_pads_audio(tmp_path, video_factory):
    path = video_factory(tmp_path / "a.mp4", seconds=2.0)
    clip = decode_window(path, start=1.5, num_frames=4, fps=2.0, size=(16, 24), audio_rate=8000)
    assert clip.frames.shape == (4, 16, 24, 3)
    assert np.array_equal(clip.frames[-1], clip.frames[-2])
    assert clip.audio.shape == (16000,)
    assert np.abs(clip.audio[-4000:]).max() == 0.0  # [3.0, 3.5) s lies past the 2 s of audio


def test_audio_is_resampled_to_the_requested_rate(tmp_path, video_factory):
    path = video_factory(tmp_path / "a.mp4", seconds=2.0, audio_rate=44100, tone_hz=1000.0)
    clip = decode_window(path, 0.0, 4, 2.0, 16, audio_rate=16000)
    assert clip.audio.shape == (32000,)
    assert dominant_hz(clip.audio[4000:28000], 16000) == pytest.approx(1000.0, abs=3.0)


@pytest.mark.parametrize("content, reason", [
    (b"", "not a readable media file"),
    (b"this is not a video at all" * 100, "not a readable media file"),
])
def test_garbage_is_rejected_with_a_reason(content, reason):
    with pytest.raises(DecodeError, match=reason):
        probe(content)


def test_truncated_video_is_rejected(tmp_path, video_factory):
    data = video_factory(tmp_path / "a.mp4").read_bytes()
    with pytest.raises(DecodeError):
        probe(data[: len(data) // 3])


def test_limits_are_enforced(tmp_path, video_factory):
    path = video_factory(tmp_path / "a.mp4", size=(96, 80))
    with pytest.raises(DecodeError, match="exceeds the limit"):
        probe(path, max_pixels=64 * 64)
    with pytest.raises(DecodeError, match="duration"):
        probe(path, max_seconds=1.0)


def test_audio_only_file_has_no_video_stream(tmp_path):
    import av
    path = tmp_path / "a.m4a"
    with av.open(str(path), "w", format="mp4") as out:
        s = out.add_stream("aac", rate=16000)
        s.layout = "mono"
        for i in range(20):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    with pytest.raises(DecodeError, match="no video stream"):
        probe(path)
