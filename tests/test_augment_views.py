"""Per-view augmentation: CSTP's second crop overlapping the first (KT27-A/CSTP preprocess_data.py
ClipRandomSizedCropOverlap), CVRL's asymmetric blur and solarisation (tensorflow/models video_ssl
dataloaders/video_ssl_input.py `_process_image`), and which view of its sample a call augments."""

from __future__ import annotations

import random

import pytest
import torch

from mmvssl.data.augment import Augmenter, AugmentOptions, overlapping_crop

SHARES = (1.0, 0.8, 0.6, 0.4, 0.2)


def test_overlapping_crop_keeps_the_size_and_covers_a_drawn_share_of_the_first():
    first = {"top": 20, "left": 30, "height": 40, "width": 50}
    seen = set()
    for seed in range(400):
        second = overlapping_crop(first, 100, 120, SHARES, random.Random(seed))
        assert (second["height"], second["width"]) == (40, 50)
        assert 0 <= second["left"] <= 120 - 50 and 0 <= second["top"] <= 100 - 40
        overlap_w = 50 - abs(second["left"] - 30)
        overlap_h = 40 - abs(second["top"] - 20)
        share = overlap_w * overlap_h / (50 * 40)
        nearest = min(SHARES, key=lambda s: abs(s - share))
        # s_h = int(share x w x h / s_w): the covered area is short of the share by less than one pixel row
        assert 0 <= nearest - share < overlap_w / (50 * 40) + 1e-12
        seen.add(nearest)
    assert seen == set(SHARES)
    # a crop as large as the frame can only overlap itself wholly
    full = {"top": 0, "left": 0, "height": 100, "width": 120}
    assert overlapping_crop(full, 100, 120, SHARES, random.Random(0)) == full


def _frames():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 40, 48, 3), dtype=torch.uint8, generator=g)


def test_the_second_view_of_a_sample_crops_against_the_first_and_a_new_sample_starts_over():
    aug = Augmenter(AugmentOptions(video=True, crop_scale=(0.2, 1.0), crop_overlap=SHARES, flip=0.0,
                                   jitter_p=0.0, grayscale=0.0), 16)
    frames = _frames()
    for seed in range(20):
        rng = random.Random(seed)
        _, (ax0, ay0, ax1, ay1), _ = aug.video_crop_flip(frames, rng)
        _, (bx0, by0, bx1, by1), _ = aug.video_crop_flip(frames, rng)  # the same sample's next view
        assert aug.view_index(random.Random(seed)) == 0  # another generator: another sample's first view
        assert (bx1 - bx0, by1 - by0) == pytest.approx((ax1 - ax0, ay1 - ay0))
        assert min(ax1, bx1) > max(ax0, bx0) and min(ay1, by1) > max(ay0, by0)  # they overlap
    plain = Augmenter(AugmentOptions(video=True, flip=0.0, jitter_p=0.0, grayscale=0.0), 16)
    rng = random.Random(3)
    crops = [plain.video_crop_flip(frames, rng)[1] for _ in range(2)]  # without crop_overlap: drawn apart
    assert crops[0] != crops[1]


def test_blur_and_solarisation_per_view_as_cvrl():
    """CVRL: blur p 1.0 on the first clip and 0.1 on the second, solarisation p 0.2 on the second only.
    Each view runs its own transforms; with solarisation p 1 the second view is exactly the plain crop
    with pixels >= 128 turned to 255 - x (TF's x >= 0.5 -> 1 - x on uint8), after the blur."""
    from torchvision.transforms import v2
    off = dict(video=True, crop_scale=(1.0, 1.0), crop_ratio=(48 / 40, 48 / 40), flip=0.0, jitter_p=0.0,
               grayscale=0.0)
    frames = _frames()
    cvrl = Augmenter(AugmentOptions(**off, blur_per_view=(1.0, 0.1), solarize_per_view=(0.0, 0.2)), 16)
    assert len(cvrl.view_transforms) == 2 and cvrl.video_transform is cvrl.view_transforms[0]
    blur = [t.transforms[4] for t in cvrl.view_transforms]
    assert [b.p for b in blur] == [1.0, 0.1] and all(isinstance(b.transforms[0], v2.GaussianBlur) for b in blur)
    assert len(cvrl.view_transforms[0].transforms) == 5  # no solarisation on the first view
    solarize = cvrl.view_transforms[1].transforms[5]
    assert isinstance(solarize, v2.RandomSolarize) and solarize.p == 0.2 and solarize.threshold == 128

    plain = Augmenter(AugmentOptions(**off), 16)
    always = Augmenter(AugmentOptions(**off, blur_per_view=(0.0, 0.0), solarize_per_view=(0.0, 1.0)), 16)
    reference = plain.video(frames, random.Random(0))  # the full-frame crop resized, nothing else
    for seed in range(3):
        rng = random.Random(seed)
        first, second = (always.video_crop_flip(frames, rng)[0] for _ in range(2))
        assert torch.equal(first, reference)
        assert torch.equal(second, torch.where(reference >= 128, 255 - reference, reference))
    assert always.view_index(rng) == 2  # a third view of the sample would take the lists' last entries
