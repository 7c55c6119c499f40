import random

import numpy as np
import pytest

from mmvssl.data.sampling import (cvrl_gap, cvrl_pair, global_local_windows, long_short_windows, select_texts,
                                  uniform_windows, view_windows)


def test_cvrl_gap_density_decreases_linearly():
    rng = random.Random(0)
    gaps = np.array([cvrl_gap(8.0, rng) for _ in range(20000)])
    counts, _ = np.histogram(gaps, bins=4, range=(0, 8))
    # p(t) = 2 (8 - t) / 64: the four bins hold 7/16, 5/16, 3/16, 1/16 of the mass
    assert np.allclose(counts / len(gaps), [7 / 16, 5 / 16, 3 / 16, 1 / 16], atol=0.01)


def test_cvrl_pair_stays_inside_the_video():
    rng = random.Random(1)
    for _ in range(200):
        a, b = cvrl_pair(10.0, 2.0, rng)
        assert 0 <= a <= 8 + 1e-9 and 0 <= b <= 8 + 1e-9
    assert cvrl_pair(1.0, 2.0, rng) == [0.0, 0.0]  # shorter than the window: both at the start


def test_long_short_nests_the_short_clip():
    rng = random.Random(2)
    for _ in range(200):
        long_start, short_start = long_short_windows(10.0, 4.0, 1.0, rng)
        assert long_start <= short_start and short_start + 1.0 <= long_start + 4.0 + 1e-9


def test_svt_cuts_every_view_from_one_clip_with_its_spans():
    # clip = 3 x 1 s; globals: the clip less 5/256 of it at the end (view 0) / the start (view 1);
    # locals: an eighth of the clip (0.375 s) each, inside it (kahnchana/svt datasets/decoder.py)
    views = view_windows("svt", 10.0, 1.0, random.Random(3), True, long_scale=3.0, num_global=2, num_local=3)
    shift = 3.0 * 5 / 256
    assert [n for _, n in views] == pytest.approx([3.0 - shift, 3.0 - shift, 0.375, 0.375, 0.375])
    clip_start = views[0][0]
    assert views[1][0] == pytest.approx(clip_start + shift) and 0 <= clip_start <= 7.0
    assert all(clip_start - 1e-9 <= s and s + n <= clip_start + 3.0 + 1e-9 for s, n in views[2:])
    assert len(global_local_windows(10.0, 3.0, 1, 1, random.Random(0))) == 2


def test_carl_crops_differ_in_length_stay_in_the_video_and_start_near_each_other():
    rng = random.Random(4)
    lengths = []
    for _ in range(300):
        (a, la), (b, lb) = view_windows("carl", 20.0, 2.0, rng, True, long_scale=1.5)
        assert 2.0 <= la <= 3.0 and 2.0 <= lb <= 3.0  # U[1, 1.5] x the window
        assert 0 <= a <= 20 - la + 1e-9 and 0 <= b <= 20 - lb + 1e-9
        assert abs(b - a) <= 0.8 * la + 1e-9  # CARL's CONSISTENT_OFFSET 0.2
        lengths.append(la - lb)
    assert min(lengths) < -0.5 and max(lengths) > 0.5


def test_overlapping_pair_draws_cstps_overlap_classes_uniformly_at_one_rate():
    """KT27-A/CSTP datasets.py: one rate for both clips (uniform among those that fit), the second clip
    covering a share 1.0, 0.8, ..., 0.2 of the first, the class uniform (a long video: few redraws)."""
    rng = random.Random(5)
    shares, rates = [], []
    for _ in range(4000):
        (a, n), (b, m) = view_windows("overlap", 30.0, 2.0, rng, True)  # long_scale 2: rates 1 and 2
        assert n == m and 0 <= min(a, b) and max(a, b) + n <= 30.0 + 1e-9
        shares.append(1 - abs(a - b) / n)
        rates.append(n / 2.0)
    classes = np.abs(np.array(shares)[:, None] - np.array([1.0, 0.8, 0.6, 0.4, 0.2])).argmin(1)
    assert np.allclose(np.array(shares), 1.0 - 0.2 * classes, atol=1e-9)
    assert np.allclose(np.bincount(classes, minlength=5) / len(shares), 0.2, atol=0.03)
    assert set(rates) == {1.0, 2.0} and abs(np.mean(rates) - 1.5) < 0.03


def test_curriculum_pair_keeps_its_distance_within_the_share_of_the_video():
    rng = random.Random(6)
    for share in (0.0, 0.25, 1.0):
        distances = []
        for _ in range(300):
            (a, n), (b, _) = view_windows("concur", 12.0, 2.0, rng, True, span_share=share)
            assert 0 <= a <= b <= 10.0 + 1e-9 and n == 2.0
            distances.append(b - a)
        assert max(distances) <= share * 10.0 + 1e-9
        if share:
            assert max(distances) > 0.8 * share * 10.0  # uniform up to the bound


def test_uniform_and_center():
    assert uniform_windows(10.0, 2.0, 3) == [0.0, 4.0, 8.0]
    assert view_windows("random", 10.0, 2.0, random.Random(0), train=False) == [(4.0, 2.0)]
    with pytest.raises(ValueError, match="unknown sampler 'nope' .*overlap"):
        view_windows("nope", 10.0, 2.0, random.Random(0), True)


def test_select_texts_puts_the_overlapping_narration_first_then_the_nearest():
    meta = {"caption": "cap", "narrations": [{"start": 0, "end": 1, "text": "far"},
                                             {"start": 5, "end": 6, "text": "overlap"},
                                             {"start": 7, "end": 8, "text": "near"}]}
    assert select_texts(meta, 4.5, 5.5, 4) == ["cap", "overlap", "near", "far"]
    assert select_texts({}, 0, 1, 3) == []


def test_data_config_reaches_the_sample_spec():
    from omegaconf import OmegaConf

    from mmvssl.data.options import DataConfig, loader_options, sample_spec
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"sampler": "cvrl", "augment": {"video": True, "flip": 0.0}})
    spec = sample_spec(cfg, train=True, seed=3)
    assert spec.sampler == "cvrl" and spec.augment.video and spec.augment.flip == 0.0
    assert spec.augment.crop_scale == (0.3, 1.0) and spec.augment.jitter == (0.8, 0.8, 0.8, 0.2)
    default = sample_spec(OmegaConf.structured(DataConfig), train=True, seed=0)
    assert not default.augment.video and not default.augment.audio and default.sampler == "random"
    assert loader_options(cfg)["mode"] == "resampled"


def test_sliding_windows_and_frame_times_are_the_ones_narrate_search_and_decode_use():
    from mmvssl.data.sampling import frame_times, sliding_windows
    assert sliding_windows(10.0, 4.0, 2.0) == [0.0, 2.0, 4.0, 6.0]  # the last window ends at the video's end
    assert sliding_windows(9.0, 4.0, 2.0) == [0.0, 2.0, 4.0]  # 6.0 would end past 9 s
    assert sliding_windows(3.0, 4.0, 2.0) == [0.0]  # a video shorter than the window: one window
    assert sliding_windows(1.0, 0.3, 0.1)[-1] == 0.7  # rounded to the millisecond, no 0.7000000001
    assert frame_times(1.5, 4, 2.0).tolist() == [1.5, 2.0, 2.5, 3.0]
