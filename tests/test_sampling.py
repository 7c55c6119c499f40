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


def test_global_local_counts_and_spans():
    views = view_windows("svt", 10.0, 1.0, random.Random(3), True, long_scale=3.0, num_global=2, num_local=3)
    assert [n for _, n in views] == [3.0, 3.0, 1.0, 1.0, 1.0]
    assert all(0 <= s <= 10 - n + 1e-9 for s, n in views)
    assert len(global_local_windows(10.0, 3.0, 1.0, 1, 1, random.Random(0))) == 2


def test_uniform_and_center():
    assert uniform_windows(10.0, 2.0, 3) == [0.0, 4.0, 8.0]
    assert view_windows("random", 10.0, 2.0, random.Random(0), train=False) == [(4.0, 2.0)]
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
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
