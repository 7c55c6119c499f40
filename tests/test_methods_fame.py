"""FAME as its official code defines it (Mark12Ding/FAME, moco/loader.py): the static foreground mask
and the merge against the official numbers of tests/data/parity/fame (every step: tests/parity/fame.py),
the method's prepare on normalised views, kornia's HSV by hand, the two clips of the shipped config.
(Training on the demo shards and the falling loss: tests/test_methods.py, over configs/methods/fame.yaml.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmvssl.data.loader import VIDEO_MEAN, VIDEO_STD
from mmvssl.errors import ConfigError

CASES = sorted((Path(__file__).parent / "data" / "parity" / "fame").glob("case_*.safetensors"))


def _normalised(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, T, H, W) in [0, 1] -> normalised as the loader's."""
    return (rgb - VIDEO_MEAN) / VIDEO_STD


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_the_mask_and_the_merge_are_the_official_ones(path):
    from mmvssl.methods.fame import foreground_mask, merge
    case = load_file(path)
    mask = foreground_mask(case["video"], beta=0.5)
    assert torch.equal(mask, case["mask"])
    H, W = mask.shape[1:]
    assert (mask.flatten(1).sum(1) == int(0.5 * H * W)).all()  # exactly beta of the pixels, one mask per clip
    assert torch.equal(merge(case["video"], mask, case["perm"]), case["fused"])  # 0/1 weights: the pixels themselves


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_prepare_merges_the_query_of_normalised_views_with_the_official_mask(path):
    from mmvssl.methods.fame import FAME, FAMEOptions
    case = load_file(path)
    video = case["video"]  # (B, 3, T, H, W) in [0, 1]
    key = torch.rand_like(video)
    batch = {"video": _normalised(torch.stack([video, key], dim=1))}
    torch.manual_seed(0)
    out = FAME(FAMEOptions(colour_augment=False)).prepare(batch)
    # un-normalising moves the pixels by float rounding (~1e-7); the official top-k gaps are >= 3e-6
    agreement = (out["fame_mask"] == case["mask"]).float().mean().item()
    assert agreement >= 0.99, agreement
    perm, m = out["fame_perm"], out["fame_mask"][:, None, None]
    assert sorted(perm.tolist()) == list(range(len(perm)))
    torch.testing.assert_close(out["video"][:, 0], batch["video"][:, 0][perm] * (1 - m) + batch["video"][:, 0] * m,
                               rtol=0, atol=1e-5)  # the query: its foreground on clip perm[i]'s frames
    torch.testing.assert_close(out["video"][:, 1], batch["video"][:, 1], rtol=0, atol=1e-5)  # the key: not merged


def test_hsv_is_kornias_with_the_hue_in_radians():
    from mmvssl.methods.fame import rgb_to_hsv
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.25, 0.0],
                        [1.0, 0.0, 0.5]]).T[:, :, None]  # (3, 6, 1): red, green, blue, black, orange, pink
    h, s, v = rgb_to_hsv(rgb)[:, :, 0]
    want_h = torch.tensor([0.0, 2 / 3, 4 / 3, 0.0, 1 / 6, 2 - 1 / 6]) * math.pi  # sextants 0, 2, 4; 30 deg; 330 deg
    torch.testing.assert_close(h, want_h, rtol=0, atol=1e-6)
    torch.testing.assert_close(s, torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0]), rtol=0, atol=1e-6)  # black: s = 0
    torch.testing.assert_close(v, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5, 1.0]))


def test_colour_index_keeps_upstreams_two_pi_times_radians():
    from mmvssl.methods.fame import colour_coordinates, colour_index
    hsv = torch.tensor([2 * math.pi / 3, 1.0, 1.0])[None, :, None, None]  # pure green: h = 2.094 rad
    coords = colour_coordinates(hsv)[0, :, 0, 0]
    angle = 2 * math.pi * (2 * math.pi / 3)  # upstream's cos(2 pi h) with h in radians, not cos(h)
    want = torch.tensor([9 * (math.cos(angle) + 1) / 2 + 1, 9 * (math.sin(angle) + 1) / 2 + 1, 10.0])
    torch.testing.assert_close(coords, want, rtol=0, atol=1e-5)
    q = want.round()
    assert colour_index(coords[None, :, None, None]).item() == int(q[0] + 10 * (q[1] - 1) + 100 * (q[2] - 1))


def test_the_colour_augmentation_draws_once_per_clip_for_all_its_frames():
    from mmvssl.methods.fame import colour_augment
    torch.manual_seed(0)
    still = torch.rand(6, 3, 1, 16, 16).expand(6, 3, 4, 16, 16)  # 6 static clips
    out = colour_augment(still)
    assert out.shape == still.shape and (out >= 0).all() and (out <= 1).all()
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out))  # still static: one draw for every frame
    assert not torch.allclose(out, still)  # and something was applied


def test_fame_loss_is_nt_xent_of_merged_query_and_key_and_reaches_the_encoder():
    import mmvssl
    from mmvssl.losses.contrastive import nt_xent_loss
    from mmvssl.methods.fame import FAME, FAMEOptions
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    method = FAME(FAMEOptions(temperature=0.2))
    batch = method.prepare({"video": _normalised(torch.rand(4, 2, 3, 4, 32, 32))})
    embeddings = method.embed(student, batch)
    loss, terms = method(embeddings, batch)
    z = embeddings["video_ssl"]
    assert loss.item() == pytest.approx(nt_xent_loss(z[:, 0], z[:, 1], 0.2).item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in student.encoders["video"].parameters() if p.requires_grad)
    assert 0 <= terms["merged"].item() <= 1


def test_the_shipped_config_gives_two_different_clips_of_one_video(demo_shards):
    from mmvssl.config import load_config
    from mmvssl.data.loader import build_loader
    from mmvssl.data.options import sample_spec
    from mmvssl.resources import data_path
    cfg = load_config(data_path("configs", "methods", "fame.yaml"), ["data.num_frames=4", "data.size=32"])
    spec = sample_spec(cfg.data, train=True, seed=0)
    batch = next(iter(build_loader(demo_shards["train"], spec, batch_size=4, shuffle_buffer=4)))
    assert batch["video"].shape[:2] == (4, 2)
    starts = batch["view_times"][:, :, 0]  # (B, 2) window starts of query and key, one video per row
    assert (starts[:, 0] != starts[:, 1]).any()  # different clips, not two augmentations of one window
    assert cfg.data.augment.jitter_p == 0 and cfg.data.augment.grayscale == 0  # colour comes after FAME


def test_fame_refuses_one_window_and_a_bad_beta(demo_shards, tmp_path):
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    with pytest.raises(ConfigError, match="method 'fame' pairs two clips of one video.*'same'"):
        pretrain(tiny_config(data_path("configs", "methods", "fame.yaml"), demo_shards["train"], tmp_path,
                             "data.sampler=same", "data.num_clips=2"))
    from mmvssl.methods.fame import FAME, FAMEOptions
    with pytest.raises(ConfigError, match="beta must be in"):
        FAME(FAMEOptions(beta=1.0))
