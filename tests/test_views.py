"""`mmvssl views`: the views each shipped config's real pipeline (loader, sampler, augmentation, and the
method's `prepare` where it makes views on the device) produces, checked through the CLI against the
geometry each paper defines. The demo videos last 3 s."""

from __future__ import annotations

import json

import pytest

from mmvssl.cli import main
from mmvssl.resources import data_path

FAST = ["data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=8"]


def _views(name, shards, out, *extra, batches=1, step=0, batch_size=8) -> dict:
    config = data_path("configs", "methods", f"{name}.yaml")
    assert main(["views", str(config), *FAST, f"data.batch_size={batch_size}", *extra, "--data", str(shards),
                 "--out", str(out), "--batches", str(batches), "--step", str(step)]) == 0
    assert (out / "views.png").stat().st_size > 1000
    report = json.loads((out / "views.json").read_text())
    assert report["method"] and report["config"]["method"]["name"]
    assert len(report["samples"]) == batch_size * batches
    return report


def _groups(sample) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for view in sample["views"]:
        out.setdefault(view["group"], []).append(view)
    return out


def _span(view) -> float:
    return view["end"] - view["start"]


def test_views_command_writes_every_field_and_refuses_a_single_view_sampler(demo_shards, tmp_path, capsys):
    report = _views("simclr", demo_shards["train"], tmp_path / "simclr")
    for sample in report["samples"]:
        assert sample["key"] and sample["duration"] == pytest.approx(3.0, abs=0.2)
        assert [v["index"] for v in sample["views"]] == [0, 1] and {v["group"] for v in sample["views"]} == {"video"}
        for view in sample["views"]:
            assert set(view) >= {"group", "index", "start", "end", "frames", "fps", "crop", "flip"}
            assert view["frames"] == 8 and view["fps"] == pytest.approx(4.0)
            x0, y0, x1, y1 = view["crop"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and isinstance(view["flip"], bool)
        a, b = sample["views"]
        assert (a["start"], a["end"]) == (b["start"], b["end"]) and a["crop"] != b["crop"]  # SimCLR: one window
    areas = [(v["crop"][2] - v["crop"][0]) * (v["crop"][3] - v["crop"][1]) for s in report["samples"] for v in s["views"]]
    assert min(areas) >= 0.08 - 1e-6 and min(areas) < 0.3  # SimCLR's crop area 0.08-1, not CVRL's 0.3-1
    config = data_path("configs", "methods", "simclr.yaml")
    assert main(["views", str(config), "data.sampler=random", "--data", str(demo_shards["train"]),
                 "--out", str(tmp_path / "x")]) == 2
    assert "gives one view per sample" in capsys.readouterr().err


def test_svt_cuts_globals_and_more_than_two_locals_from_one_clip_at_different_rates(demo_shards, tmp_path):
    report = _views("svt", demo_shards["train"], tmp_path)
    clip = 2.0 * 8 / 4.0  # long_scale x the 2 s window
    for sample in report["samples"]:
        groups = _groups(sample)
        globals_, locals_ = groups["video"], groups["video/local"]
        assert len(globals_) == 2 and len(locals_) == 8  # SVT's 2 global and 8 local views
        start = min(v["start"] for v in sample["views"])
        assert max(v["end"] for v in sample["views"]) <= start + clip + 1e-6  # one clip
        for g in globals_:
            assert _span(g) == pytest.approx(clip * (1 - 5 / 256)) and g["frames"] == 8
        for v in locals_:
            assert _span(v) == pytest.approx(clip / 8) and v["frames"] == 4
            assert v["fps"] == pytest.approx(4 / (clip / 8))  # 8 fps
        assert globals_[0]["fps"] < locals_[0]["fps"] / 3  # ~2 fps: the rates differ 4x at the demo's frame counts
        assert len({round(v["start"], 6) for v in locals_}) > 1  # placed at random in the clip


def test_carl_takes_two_temporal_crops_of_different_length_and_rate(demo_shards, tmp_path):
    report = _views("carl", demo_shards["train"], tmp_path)
    for sample in report["samples"]:
        a, b = sample["views"]
        assert {a["group"], b["group"]} == {"video"} and a["frames"] == b["frames"] == 8
        assert 2.0 - 1e-6 <= _span(a) <= 3.0 + 1e-6 and 2.0 - 1e-6 <= _span(b) <= 3.0 + 1e-6
        assert abs(_span(a) - _span(b)) > 1e-4 and abs(a["fps"] - b["fps"]) > 1e-4  # not one window twice
        assert abs(b["start"] - a["start"]) <= 0.8 * _span(a) + 1e-6


def test_constcl_views_differ_in_time_and_crop_and_carry_their_own_boxes(demo_shards, tmp_path):
    report = _views("constcl", demo_shards["train"], tmp_path)
    assert report["device_views"]
    differ_in_time = 0
    for sample in report["samples"]:
        a, b = sample["views"]
        differ_in_time += abs(a["start"] - b["start"]) > 1e-3
        assert a["crop"] != b["crop"]
        assert len(a["constcl_boxes"]) == len(b["constcl_boxes"]) == 4 and a["constcl_boxes"] != b["constcl_boxes"]
    assert differ_in_time >= 6


def test_cstp_clip_overlaps_spread_over_upstreams_shares_at_one_playback_rate(demo_shards, tmp_path):
    """CSTP (KT27-A/CSTP datasets.py, preprocess_data.py): both clips at one rate (8 frames over 0.8 s x
    1, 2 or 4 at 10 fps in the 3 s videos), the second shifted so that it covers a share 1.0 ... 0.2 of
    the first in time, its crop the first's size covering such a share of it; each clip rotated."""
    report = _views("cstp", demo_shards["train"], tmp_path, batches=3)
    shares = (1.0, 0.8, 0.6, 0.4, 0.2)
    temporal, rates = set(), set()
    for sample in report["samples"]:
        a, b = sample["views"]
        assert a["frames"] == b["frames"] == 8 and _span(a) == pytest.approx(_span(b))
        rate = _span(a) / 0.8
        assert rate == pytest.approx(2 ** sample["cstp_rate"], rel=1e-6)
        share = max(0.0, min(a["end"], b["end"]) - max(a["start"], b["start"])) / _span(a)
        assert share == pytest.approx(shares[sample["cstp_temporal"]], abs=1e-6)
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["crop"], b["crop"]
        assert bx1 - bx0 == pytest.approx(ax1 - ax0, abs=1e-6) and by1 - by0 == pytest.approx(ay1 - ay0, abs=1e-6)
        covered = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
        # the overlap's height is rounded down to a pixel of the decoded frame (short side 74 px)
        assert covered / ((ax1 - ax0) * (ay1 - ay0)) == pytest.approx(shares[sample["cstp_spatial"]], abs=0.06)
        assert a["cstp_rotation"] in range(4) and b["cstp_rotation"] in range(4)
        temporal.add(sample["cstp_temporal"]), rates.add(sample["cstp_rate"])
    assert len(temporal) >= 3 and rates == {0, 1}


def test_concur_span_grows_with_the_step_and_is_bounded_by_the_video(demo_shards, tmp_path):
    steps = ["train.max_steps=8"]  # the curriculum: a share of the video growing from 0 to 1 over steps 0..4
    first = _views("concur", demo_shards["train"], tmp_path / "first", *steps, step=0)
    late = _views("concur", demo_shards["train"], tmp_path / "late", *steps, step=4)
    for sample in first["samples"]:
        a, b = sample["views"]
        assert b["start"] == pytest.approx(a["start"]) and sample["concur_distance"] == 0
    distances = []
    for sample in late["samples"]:
        a, b = sample["views"]
        distance = b["start"] - a["start"]
        assert 0 <= distance <= sample["duration"] - _span(a) + 1e-6  # within the video, not one decoded window
        distances.append(distance)
    assert max(distances) > 0.3


def test_teg_long_clip_runs_at_the_short_clips_rate_around_it(demo_shards, tmp_path):
    report = _views("teg", demo_shards["train"], tmp_path)
    for sample in report["samples"]:
        groups = _groups(sample)
        (short,), (long,) = groups["video"], groups["video/long"]
        assert short["frames"] == 8 and long["frames"] == 16
        assert short["fps"] == pytest.approx(long["fps"]) == pytest.approx(4.0)
        assert long["start"] - 1e-6 <= short["start"] and short["end"] <= long["end"] + 1e-6
        offset = (short["start"] - long["start"]) * 4.0  # in frames
        assert offset == pytest.approx(round(offset), abs=1e-6) and round(offset) % 4 == 0


def test_a_config_with_an_online_image_teacher_shows_the_loaders_views_without_loading_it(demo_shards, tmp_path):
    report = _views("iboot", demo_shards["train"], tmp_path, "teacher.arch=/nonexistent/teacher.json")
    assert not report["device_views"]  # the method (and its teacher) were not built
    for sample in report["samples"]:
        a, b = sample["views"]
        assert (a["start"], a["end"]) == (b["start"], b["end"]) and a["crop"] != b["crop"]  # iBoot: one window


def test_fame_views_are_two_windows_of_the_same_video(demo_shards, tmp_path):
    """FAME (official moco/loader.py): the query and key are two clips of one video, each inside it."""
    report = _views("fame", demo_shards["train"], tmp_path)
    apart = 0
    for sample in report["samples"]:
        a, b = sample["views"]
        assert a["group"] == b["group"] == "video" and a["frames"] == b["frames"] == 8
        for view in (a, b):
            assert -1e-6 <= view["start"] and view["end"] <= sample["duration"] + 1e-6
            assert _span(view) == pytest.approx(2.0)  # 8 frames at 4 fps
        apart += abs(a["start"] - b["start"]) > 1e-3
    assert apart >= 6  # two windows, not one decoded twice (CVRL's gap may fall near 0 now and then)


def _rank_above(runs: list[float], chosen: float) -> int:
    """How many candidates have strictly more motion than the chosen one (ties count for it)."""
    return sum(r > chosen for r in runs)


def test_mcl_draws_its_clip_among_the_most_moving_half_of_the_runs(demo_shards, tmp_path):
    """MCL (official video_dataset.motion_focus_temporal_sampling): with the focused draw forced (the
    shipped config focuses 70% of the time), the kept run of 8 of the 16 decoded frames is among the
    int(0.5 R) + 1 runs of most motion; views.json carries every candidate's motion."""
    report = _views("mcl", demo_shards["train"], tmp_path, "method.options.focus_probability=1.0")
    assert report["device_views"]
    for sample in report["samples"]:
        runs, start = sample["mcl_run_motion"], sample["mcl_start"]
        assert len(runs) == 16 - 8 + 1 and 0 <= start < len(runs)
        assert _rank_above(runs, runs[start]) < int(0.5 * len(runs)) + 1
        assert all(view["frames"] == 8 for view in sample["views"])  # both views keep the run
    starts = {s["mcl_start"] for s in report["samples"]}
    assert len(starts) > 1  # a draw, not one fixed run


def test_mscl_draws_its_clip_above_the_median_motion(demo_shards, tmp_path):
    """MSCL (official MDS): the kept run's motion is above the median of the window's candidate runs
    (any run when none is)."""
    report = _views("mscl", demo_shards["train"], tmp_path)
    assert report["device_views"]
    for sample in report["samples"]:
        runs, start = sample["mscl_run_motion"], sample["mscl_start"]
        assert len(runs) == 9 and 0 <= start < len(runs)
        median = sorted(runs)[len(runs) // 2]  # torch.median: the middle of the 9
        assert runs[start] > median or not any(r > median for r in runs)
        assert all(view["frames"] == 8 for view in sample["views"])


def _shards_of(video_folder, out):
    from mmvssl.data.shards import build_shards
    build_shards(video_folder, out, samples_per_shard=8)
    return out


@pytest.mark.parametrize("name", ["maclr", "mscl", "mcl"])
def test_the_temporal_gradient_is_taken_between_consecutive_decoded_frames(name, tmp_path):
    """A 20 fps video whose red level rises 255 / 60 per frame, sampled at 4 fps (maclr) or 8 fps (mcl,
    mscl): the motion input's partner frame (`video_next`) is the next decoded frame (about 4.25 levels
    away), not the next sampled one (5 or 2.5 source frames on)."""
    from tests.conftest import make_video
    (tmp_path / "videos").mkdir()
    make_video(tmp_path / "videos" / "ramp.mp4", seconds=3.0, fps=20, audio_rate=None)
    shards = _shards_of(tmp_path / "videos", tmp_path / "shards")
    report = _views(name, shards, tmp_path / "views", "data.augment.video=false", batch_size=2)
    step = 255 / 60
    for sample in report["samples"]:
        for view in sample["views"]:
            following, sampled = view["next_frame_change"], view["sampled_frame_change"]
            inside = following[:-1]  # the last frame of a window may sit at the video's end
            # integer levels through H.264's colour conversion: a frame's change is 2..7 levels, their mean
            # close to one step; every one far below the 5 steps between sampled frames
            assert 0.6 * step < sum(inside) / len(inside) < 1.6 * step and max(inside) < 2.5 * step, inside
            # sampled frames are 20 / data.fps source frames apart (maclr 4 fps: 5; mcl, mscl 8 fps: 2.5)
            apart = 20 / report["config"]["data"]["fps"]
            assert 0.6 * apart * step < sum(sampled) / len(sampled) < 1.6 * apart * step, sampled


def _moving_texture_video(path, fps=20, seconds=3.0, shift=2, size=(80, 64)):
    """A smooth random grey texture moving right by `shift` px per frame."""
    import av
    import cv2
    import numpy as np
    W, H = size
    frames = int(fps * seconds)
    wide = W + shift * frames
    rng = np.random.default_rng(0)
    texture = cv2.resize(rng.integers(0, 256, (H // 4, wide // 4)).astype(np.float32), (wide, H),
                         interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for k in range(frames):
            x0 = shift * (frames - k)  # the window slides left: the content moves right
            grey = texture[:, x0:x0 + W]
            frame = av.VideoFrame.from_ndarray(np.repeat(grey[:, :, None], 3, axis=2), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("name", ["maclr_flow", "mscl_flow"])
def test_cached_flow_is_taken_between_consecutive_decoded_frames(name, tmp_path):
    """A texture moving 2 px per frame at 20 fps, flow cached by `shards add-flow` at 4 fps: the flow
    each sampled frame gets moves about 2 px to the right (consecutive source frames), not 10 (the
    next sampled frame, 5 source frames on). Unaugmented views: the clip's pixels are the source's."""
    from mmvssl.data.add_flow import add_flow
    (tmp_path / "videos").mkdir()
    _moving_texture_video(tmp_path / "videos" / "texture.mp4")
    shards = _shards_of(tmp_path / "videos", tmp_path / "shards")
    add_flow(str(shards), tmp_path / "flow", fps=4.0, size=64, progress=False)
    report = _views(name, tmp_path / "flow", tmp_path / "views", "data.augment.video=false", batch_size=2)
    for sample in report["samples"]:
        for view in sample["views"]:
            dx = [f[0] for f in view["flow_mean"]]
            dy = [f[1] for f in view["flow_mean"]]
            inside = dx[:-1]  # the last frame of a window may sit at the video's end (no successor: 0)
            # DIS on a smooth texture, edges included: within a pixel of the true 2 px
            assert all(1.0 < x < 3.0 for x in inside), dx
            assert all(abs(y) < 0.75 for y in dy), dy
