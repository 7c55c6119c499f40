"""FAME: the foreground of a moving object from frame differences and colour, the merged clip keeps
the source's foreground pixels on another clip's background, a still clip is kept whole. (Training
on the demo shards and the falling loss: tests/test_methods.py, over configs/methods/fame.yaml.)"""

from __future__ import annotations

import pytest
import torch

from mmvssl.data.loader import VIDEO_MEAN, VIDEO_STD
from mmvssl.errors import ConfigError


def _normalised(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, T, H, W) in [0, 1] -> normalised as the loader's."""
    return (rgb - VIDEO_MEAN) / VIDEO_STD


def _moving_square(T=4, size=32, side=8, step=2, x0=4, y0=10, colour=(1.0, 0.0, 0.0), grey=0.1):
    """A square of `colour` moving `step` px right per frame on a flat grey background: (3, T, H, W)
    normalised, and its true foreground (T, H, W) bool."""
    rgb = torch.full((3, T, size, size), grey)
    truth = torch.zeros(T, size, size, dtype=torch.bool)
    for t in range(T):
        x = x0 + step * t
        truth[t, y0:y0 + side, x:x + side] = True
        rgb[:, t, y0:y0 + side, x:x + side] = torch.tensor(colour)[:, None, None]
    return _normalised(rgb), truth


def test_motion_map_is_the_differences_entering_and_leaving_each_frame():
    from mmvssl.methods.fame import motion_map
    video = torch.zeros(1, 1, 3, 1, 2)
    video[0, 0, :, 0, 0] = torch.tensor([0.0, 2.0, 5.0])  # pixel 0 over 3 frames; pixel 1 still
    m = motion_map(video)
    # frame 0: |2 - 0| (leaving) ; frame 1: |5 - 2| + |2 - 0| ; frame 2: |5 - 2| (entering)
    torch.testing.assert_close(m[0, :, 0, 0], torch.tensor([2.0, 5.0, 3.0]))
    torch.testing.assert_close(m[0, :, 0, 1], torch.zeros(3))


def test_foreground_is_the_moving_object_with_its_still_inside_and_without_uncovered_background():
    from mmvssl.methods.fame import foreground_mask, motion_map
    clip, truth = _moving_square()
    still_inside = truth & (motion_map(clip[None])[0] == 0)
    assert still_inside.any()  # the square's inside does not change: frame differences alone miss it
    uncovered = (motion_map(clip[None])[0] > 0) & ~truth
    assert uncovered.any()  # where the square was: differences see it, it is background
    mask = foreground_mask(clip[None], seed_ratio=0.1, bins=8)[0]
    assert mask.shape == truth.shape
    torch.testing.assert_close(mask, truth.float())  # the colour statistics add the inside, drop the uncovered


def test_merged_clip_keeps_the_source_foreground_pixels_on_the_other_clip_background():
    from mmvssl.methods.fame import FAME, FAMEOptions
    torch.manual_seed(0)
    first, truth_first = _moving_square(colour=(1.0, 0.0, 0.0))
    second, truth_second = _moving_square(colour=(0.0, 0.0, 1.0), x0=12, y0=2, step=3, grey=0.3)
    video = torch.stack([first, second])  # (2, 3, T, H, W): view 0 of two clips
    other_view = torch.randn(2, 3, 4, 32, 32)
    method = FAME(FAMEOptions())
    batch = method.prepare({"video": torch.stack([video, other_view], dim=1)})
    merged = batch["video"][:, 0]
    assert batch["fame_donor"].tolist() == [1, 0]  # with 2 clips each takes the other's background
    for b, truth, donor in ((0, truth_first, video[1]), (1, truth_second, video[0])):
        torch.testing.assert_close(batch["fame_mask"][b], truth.float())
        fg = truth[None].expand(3, -1, -1, -1)
        torch.testing.assert_close(merged[b][fg], video[b][fg])  # the source's foreground pixels, exactly
        torch.testing.assert_close(merged[b][~fg], donor[~fg])  # the donor's pixels everywhere else
    torch.testing.assert_close(batch["video"][:, 1], other_view)  # the positive view is untouched


def test_every_clip_takes_another_clips_background():
    from mmvssl.methods.fame import FAME, FAMEOptions
    method = FAME(FAMEOptions())
    for seed in range(5):
        torch.manual_seed(seed)
        batch = method.prepare({"video": torch.randn(5, 2, 3, 4, 16, 16)})
        donor = batch["fame_donor"]
        assert sorted(donor.tolist()) == list(range(5)) and (donor != torch.arange(5)).all()


def test_a_still_clip_is_kept_whole():
    from mmvssl.methods.fame import FAME, FAMEOptions
    still = _normalised(torch.rand(3, 1, 16, 16).expand(3, 4, 16, 16))
    moving, _ = _moving_square(size=16, side=4, x0=1, y0=1)
    video = torch.stack([torch.stack([still, still]), torch.stack([moving, moving])])
    batch = FAME(FAMEOptions()).prepare({"video": video})
    torch.testing.assert_close(batch["fame_mask"][0], torch.ones(4, 16, 16))
    torch.testing.assert_close(batch["video"][0, 0], still)


def test_fame_loss_is_nt_xent_of_merged_and_other_view_and_reaches_the_encoder():
    import mmvssl
    from mmvssl.losses.contrastive import nt_xent_loss
    from mmvssl.methods.fame import FAME, FAMEOptions
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    method = FAME(FAMEOptions(temperature=0.2))
    batch = method.prepare({"video": torch.randn(4, 2, 3, 4, 32, 32)})
    embeddings = method.embed(student, batch)
    loss, terms = method(embeddings, batch)
    z = embeddings["video_ssl"]
    assert loss.item() == pytest.approx(nt_xent_loss(z[:, 0], z[:, 1], 0.2).item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in student.encoders["video"].parameters() if p.requires_grad)
    assert 0 <= terms["foreground"].item() <= 1


def test_fame_refuses_other_than_two_views(demo_shards, tmp_path):
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    with pytest.raises(ConfigError, match="method 'fame' pairs a merged clip.*num_clips=3"):
        pretrain(tiny_config(data_path("configs", "methods", "fame.yaml"), demo_shards["train"], tmp_path,
                             "data.num_clips=3"))
    from mmvssl.methods.fame import FAME, FAMEOptions
    with pytest.raises(ConfigError, match="seed_ratio must be in"):
        FAME(FAMEOptions(seed_ratio=0.0))
