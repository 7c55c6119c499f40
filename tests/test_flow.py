"""Optical flow: computed with OpenCV, cached 8-bit in shards by `shards add-flow`, paired with the
sampled frames and cropped/flipped with the clip."""

import json

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from mmvssl.cli import main
from mmvssl.data.add_flow import add_flow
from mmvssl.data.flow import MEMBER, crop_flow, decode_member, dequantise, flow_to_rgb, pair_flow, quantise, video_flow
from mmvssl.data.rawsample import read_shard

SHIFT = (2.0, -1.0)  # pixels per frame, x to the right and y down


def _texture(h, w, seed=0):
    import cv2
    noise = np.random.default_rng(seed).uniform(0, 255, (h, w)).astype(np.float32)
    grey = cv2.GaussianBlur(noise, (0, 0), 2.0)
    grey = (grey - grey.min()) / (grey.max() - grey.min()) * 255
    return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)


def _moving(n=10, size=(64, 80), shift=SHIFT):
    """n frames (n, H, W, 3) of a window moving over a texture: the content moves by `shift` px per frame."""
    H, W = size
    pad = 4 + n * int(max(abs(shift[0]), abs(shift[1])) + 1)
    big = _texture(H + 2 * pad, W + 2 * pad)
    return np.stack([big[pad - round(i * shift[1]):pad - round(i * shift[1]) + H,
                         pad - round(i * shift[0]):pad - round(i * shift[0]) + W] for i in range(n)])


def _mp4(frames, fps=10) -> bytes:
    import io
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps, options={"crf": "8"})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return buf.getvalue()


def _interior(flow):  # (..., H, W, 2) -> the median vector away from the borders
    return np.median(flow[..., 8:-8, 8:-8, :].reshape(-1, 2), axis=0)


@pytest.mark.parametrize("algorithm", ["dis", "farneback"])
def test_a_known_shift_is_recovered(algorithm):
    flow = video_flow(_moving(4), algorithm)  # (4, H, W, 2)
    assert flow.shape == (4, 64, 80, 2) and not flow[-1].any()  # the last frame has no successor
    for i in range(3):
        assert np.allclose(_interior(flow[i]), SHIFT, atol=0.25)


def test_quantisation_is_exact_at_zero_and_within_half_a_step():
    flow = np.array([[[[0.0, 3.0], [-6.0, 25.0]]]], np.float32)  # (1, 1, 2, 2)
    q, scale = quantise(flow, clip=20.0)
    assert q.dtype == np.uint8 and scale == 20.0 and q[0, 0, 0, 0] == 128
    back = dequantise(torch.from_numpy(q), scale).numpy()
    assert back[0, 0, 1, 1] == pytest.approx(20.0)  # clipped
    assert np.abs(back - np.clip(flow, -20, 20)).max() <= scale / 254 + 1e-6


def test_crop_and_flip_move_the_vectors_with_the_pixels():
    flow = torch.zeros(1, 2, 40, 80)
    flow[:, 0, :, :40] = 1.0  # left half moves right by 1 px
    out = crop_flow(flow, [0.0, 0.0, 0.5, 1.0], flipped=False, size=20)  # the left half, 40 x 40 -> 20 x 20
    assert torch.allclose(out[0, 0], torch.full((20, 20), 0.5)) and not out[0, 1].any()  # 1 px -> 0.5 px
    mirrored = crop_flow(flow, [0.0, 0.0, 1.0, 1.0], flipped=True, size=40)
    assert torch.allclose(mirrored[0, 0, :, 24:], torch.tensor(-0.5)) and not mirrored[0, 0, :, :16].any()


def _shards(folder, samples):
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "shard-000000.tar"), encoder=False) as w:
        for key, video, meta in samples:  # video None: a failed download's record (metadata only)
            members = {"mp4": video} if video is not None else {}
            w.write({"__key__": key, **members, "json": json.dumps(meta).encode()})
    return folder


def test_shift_survives_the_shards_round_trip_and_a_broken_sample_is_reported(tmp_path, capsys):
    video = _mp4(_moving(10))
    src = _shards(tmp_path / "in", [("good", video, {"duration": 1.0}), ("broken", b"not a video", {}),
                                    ("failed", None, {"status": "failed_to_download"})])
    report = add_flow(str(src), tmp_path / "out", fps=10.0, size=64, progress=False)
    entry = report["shards"]["shard-000000.tar"]
    assert entry["samples"] == 2 and entry["without_video"] == 1 and entry["frames"] == 10
    assert [s["key"] for s in entry["skipped"]] == ["broken"] and "broken" in capsys.readouterr().err
    out = {r["__key__"]: r for r in read_shard(str(tmp_path / "out" / "shard-000000.tar"))}
    assert set(out) == {"good", "failed"} and out["good"]["mp4"] == video and MEMBER not in out["failed"]
    q, scale, times, meta = decode_member(out["good"][MEMBER])
    assert q.shape == (10, 64, 80, 2) and meta["algorithm"] == "dis" and times[1] == pytest.approx(0.1)
    flow = dequantise(q, scale).numpy()
    for i in range(1, 8):  # the codec's first frames aside
        assert np.allclose(_interior(flow[i]), SHIFT, atol=0.35)
    # the loader's pairing: frames at 0.3 .. 0.6 s, the centre square (64 x 64 of 64 x 80) at 32 px
    paired = pair_flow(out["good"], torch.tensor([0.3, 0.4, 0.5, 0.6]), None, False, 32)
    assert paired.shape == (2, 4, 32, 32) and paired.dtype == torch.float32
    assert np.allclose(np.median(paired[:, :, 4:-4, 4:-4].reshape(2, -1).numpy(), axis=1),
                       np.array(SHIFT) / 2, atol=0.2)  # half the pixels: half the shift
    # resumed: nothing redone; another algorithm is refused
    again = add_flow(str(src), tmp_path / "out", fps=10.0, size=64, progress=False)
    assert again["done_before"] == ["shard-000000.tar"]
    from mmvssl.errors import MmvsslError
    with pytest.raises(MmvsslError, match="farneback.*--overwrite"):
        add_flow(str(src), tmp_path / "out", algorithm="farneback", fps=10.0, size=64, progress=False)


def test_cached_flow_is_between_consecutive_source_frames_not_cached_times(tmp_path):
    """A 20 fps video moving SHIFT px per source frame, cached at 5 fields/s (4 source frames per
    cached step): each field is the flow from the frame shown at its time to the next decoded frame,
    so its mean magnitude is |SHIFT| (2.24 px), not the 4 x |SHIFT| (8.94 px) between cached times."""
    video = _mp4(_moving(40), fps=20)  # 2 s
    src = _shards(tmp_path / "in", [("v", video, {"duration": 2.0})])
    add_flow(str(src), tmp_path / "out", fps=5.0, size=64, progress=False)
    (raw,) = read_shard(str(tmp_path / "out" / "shard-000000.tar"))
    q, scale, times, meta = decode_member(raw[MEMBER])
    assert q.shape[0] == 10 and times[1] == pytest.approx(0.2) and meta["format"] == "mmvssl-flow/2"
    flow = dequantise(q, scale).numpy()[1:]  # the codec's first frame aside; every field has a successor
    inner = flow[:, 8:-8, 8:-8, :]
    per_frame = float(np.hypot(*SHIFT))
    assert np.mean(np.linalg.norm(inner, axis=-1)) == pytest.approx(per_frame, abs=0.35)
    for field in flow:
        assert np.allclose(_interior(field), SHIFT, atol=0.35)
    # the loader's pairing keeps it per source frame: the centre square at half size, half the shift
    paired = pair_flow(raw, torch.tensor([0.4, 0.6, 0.8, 1.0]), None, False, 32)
    assert np.allclose(np.median(paired[:, :, 4:-4, 4:-4].reshape(2, -1).numpy(), axis=1),
                       np.array(SHIFT) / 2, atol=0.2)


def test_flow_of_the_older_format_is_refused_in_one_line(tmp_path):
    """Format 1 cached flow between frames 1/F s apart: its shards and its output folder are refused,
    saying why and how to recompute; --overwrite recomputes the folder."""
    from safetensors.torch import save

    from mmvssl.data.loader import SampleSpec, build_loader
    from mmvssl.errors import MmvsslError
    video = _mp4(_moving(10))
    old_member = save({"flow": torch.full((10, 64, 80, 2), 128, dtype=torch.uint8),
                       "times": torch.arange(10).float() / 10, "scale": torch.tensor([1.0])},
                      metadata={"format": "mmvssl-flow/1", "algorithm": "dis", "fps": "10.0", "size": "64",
                                "clip": "20.0", "duration": "1.0"})
    with pytest.raises(ValueError, match=r"older format mmvssl-flow/1 \(flow between cached frames 1/F s apart.*"
                                         r"add-flow .*--overwrite"):
        decode_member(old_member)
    old = _shards(tmp_path / "old", [("v0", video, {"duration": 1.0})])
    with wds.TarWriter(str(old / "shard-000000.tar"), encoder=False) as w:
        w.write({"__key__": "v0", "mp4": video, "json": b'{"duration": 1.0}', MEMBER: old_member})
    spec = SampleSpec(num_frames=2, fps=10.0, size=32, train=False, flow=True)
    with pytest.raises(MmvsslError, match=r"shard-000000.tar: sample v0: .flow.safetensors: flow cached in the "
                                          r"older format mmvssl-flow/1") as caught:
        next(iter(build_loader(str(old), spec, batch_size=1)))
    assert "\n" not in str(caught.value)
    # a folder written by format 1 (its report named no format) is not resumed: refused, then recomputed
    src = _shards(tmp_path / "in", [("v0", video, {"duration": 1.0})])
    settings = {"algorithm": "dis", "fps": 10.0, "size": 64, "clip": 20.0}
    (old / "flow_report.json").write_text(json.dumps({"settings": settings, "shards": {"shard-000000.tar": {
        "source": str(src / "shard-000000.tar"), "samples": 1, "frames": 10, "without_video": 0, "skipped": []}}}))
    with pytest.raises(MmvsslError, match=r"holds flow cached in the format mmvssl-flow/1 \(flow between cached "
                                          r"frames 1/F s apart.*, not mmvssl-flow/2: pass --overwrite") as caught:
        add_flow(str(src), old, fps=10.0, size=64, progress=False)
    assert "\n" not in str(caught.value)
    report = add_flow(str(src), old, fps=10.0, size=64, overwrite=True, progress=False)
    assert report["format"] == "mmvssl-flow/2" and report["done_before"] == []
    (raw,) = read_shard(str(old / "shard-000000.tar"))
    assert decode_member(raw[MEMBER])[3]["format"] == "mmvssl-flow/2"


def test_add_flow_command_and_the_sheet_draw_flow(tmp_path, capsys):
    src = _shards(tmp_path / "in", [("good", _mp4(_moving(10)), {"duration": 1.0, "caption": "moving"})])
    assert main(["shards", "add-flow", "--shards", str(src), "--out", str(tmp_path / "out"), "--fps", "5",
                 "--size", "32", "--algorithm", "farneback"]) == 0
    assert "1 samples, 5 frames, 0 skipped" in capsys.readouterr().out
    assert main(["shards", "inspect", str(tmp_path / "out"), "--sheet", str(tmp_path / "sheet.png")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "sheet.png").size[0] > 8 * 2 * 80 * 0.9  # 4 frames and 4 flow images across


def test_colour_wheel_coding():
    flow = np.zeros((2, 2, 2), np.float32)
    flow[0, 0] = [1.0, 0.0]   # right: red in the Middlebury wheel (hue 0)
    flow[0, 1] = [-1.0, 0.0]  # left: cyan (hue 180)
    rgb = flow_to_rgb(flow)
    assert tuple(rgb[1, 1]) == (255, 255, 255)  # still: white
    assert rgb[0, 0, 0] == 255 and rgb[0, 0, 1] == 0 and rgb[0, 1, 0] == 0 and rgb[0, 1, 2] == 255


@pytest.fixture(scope="module")
def flow_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    src = _shards(root / "in", [(f"v{i}", _mp4(_moving(20, shift=SHIFT)), {"duration": 2.0}) for i in range(3)])
    add_flow(str(src), root / "out", fps=10.0, size=64, progress=False)
    return root / "out"


def _median_xy(flow):  # (..., 2, T, H, W) -> the median x and y over everything else, away from borders
    inner = flow[..., 4:-4, 4:-4].movedim(-4, 0).reshape(2, -1)
    return inner.median(dim=1).values.tolist()


def test_loader_yields_flow_paired_and_scaled_with_the_clip(flow_shards):
    from mmvssl.data.loader import SampleSpec, build_loader
    spec = SampleSpec(num_frames=4, fps=10.0, size=32, train=False, flow=True)
    batch = next(iter(build_loader(str(flow_shards), spec, batch_size=3)))
    assert batch["flow"].shape == (3, 2, 4, 32, 32) and batch["flow"].dtype == torch.float32
    assert batch["has_flow"].tolist() == [True] * 3 and batch["video"].shape == (3, 3, 4, 32, 32)
    x, y = _median_xy(batch["flow"])  # the centre 64 x 64 square at 32 px: half the shift
    assert x == pytest.approx(SHIFT[0] / 2, abs=0.2) and y == pytest.approx(SHIFT[1] / 2, abs=0.2)


def test_loader_flips_flow_with_the_views(flow_shards):
    from mmvssl.data.augment import AugmentOptions
    from mmvssl.data.loader import SampleSpec, build_loader
    augment = AugmentOptions(video=True, flip=1.0, jitter_p=0.0, grayscale=0.0, crop_scale=(0.5, 0.5),
                             crop_ratio=(1.0, 1.0))
    spec = SampleSpec(num_frames=4, fps=10.0, size=32, train=True, seed=0, sampler="cvrl", augment=augment, flow=True)
    batch = next(iter(build_loader(str(flow_shards), spec, batch_size=2)))
    assert batch["flow"].shape == (2, 2, 2, 4, 32, 32)  # (B, V, 2, T, H, W)
    for b in range(2):
        for v in range(2):
            crops = batch["view_crops"][b].tolist() if "view_crops" in batch else batch["meta"][b]["crops"]
            x0, y0, x1, y1 = crops[v]
            gain = 32 / ((x1 - x0) * 80)  # the cached frames are 64 x 80; the crop is resized to 32 px
            x, y = _median_xy(batch["flow"][b, v])
            assert x == pytest.approx(-SHIFT[0] * gain, abs=0.25)  # flipped: moves left
            assert y == pytest.approx(SHIFT[1] * 32 / ((y1 - y0) * 64), abs=0.25)


def test_a_sample_without_flow_names_the_shard_and_the_command(tmp_path):
    from mmvssl.data.loader import SampleSpec, build_loader
    from mmvssl.errors import MmvsslError
    src = _shards(tmp_path / "in", [("v0", _mp4(_moving(10)), {"duration": 1.0})])
    spec = SampleSpec(num_frames=2, fps=10.0, size=32, train=False, flow=True)
    with pytest.raises(MmvsslError, match=r"shard-000000.tar: sample v0 has no cached optical flow.*add-flow"):
        next(iter(build_loader(str(src), spec, batch_size=1)))
