"""MCL against the official code (YihengZhang-CV/MCL-Motion-Focused-Contrastive-Learning; the numbers
of tests/data/parity/mcl, README-motion.md section 3) and the paper's definitions: the Grad-CAM is of
the positive similarity (the map the method aligns is the one of d l_pos / d tokens), the ST-motion
map is made of motion boundaries (zero for uniform motion), motion-focused sampling draws in the
most moving half and crops over the motion region, the alignment trains the encoder through the
Grad-CAM. (The falling loss on the demo shards: tests/test_methods.py.)"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmvssl.errors import ConfigError

CASES = sorted((Path(__file__).parent / "data" / "parity" / "mcl").glob("case_*.safetensors"))


def _mcl(**options):
    import mmvssl
    from mmvssl.methods.mcl import MCL, MCLOptions
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    return student, MCL(student, MCLOptions(**options), num_frames=4)


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_grad_cam_of_the_official_gradient_and_its_sign(path):
    """From the case's d l_pos / d features the functions give the official map and MAL loss. The
    official weights multiply the gradient itself, so the map does not change with the gradient's
    sign: a loss gradient differs from l_pos's through its negatives' terms, not by the sign."""
    from mmvssl.methods.mcl import grad_cam, motion_alignment
    case = load_file(path)
    weight, cam = grad_cam(case["gradient"])
    torch.testing.assert_close(cam, case["gradcam"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(motion_alignment(cam, case["st_mag"])["loss_mal"], case["loss_mal"], rtol=1e-5,
                               atol=1e-6)
    _, flipped = grad_cam(-case["gradient"])
    torch.testing.assert_close(flipped, case["gradcam"], rtol=1e-5, atol=1e-6)


def test_the_method_aligns_the_grad_cam_of_l_pos():
    """The method's align term is MAL on ReLU(sum_c w_c g_c) with g = d(sum l_pos)/d tokens of each
    view against the other view's detached embedding."""
    import torch.nn.functional as F
    from mmvssl.methods.mcl import grad_cam, motion_alignment
    student, method = _mcl()
    batch = {"video": torch.randn(3, 2, 3, 4, 32, 32), "mcl_motion": torch.rand(3, 2, 2, 4, 4)}
    emb = method.embed(student, batch)
    _, terms = method(emb, batch)
    z = F.normalize(emb["video_ssl"].float(), dim=-1)
    l_pos = (z[:, 0] * z[:, 1].detach()).sum() + (z[:, 1] * z[:, 0].detach()).sum()
    g = torch.autograd.grad(l_pos, method.captured, retain_graph=True)[0][:, 1:]  # (6, 32, width)
    g = g.transpose(1, 2).reshape(6, -1, 2, 4, 4)
    expected = motion_alignment(grad_cam(g)[1], batch["mcl_motion"].flatten(0, 1))["loss_mal"]
    torch.testing.assert_close(terms["align"], expected.detach(), rtol=1e-4, atol=1e-5)


def test_st_motion_map_is_made_of_motion_boundaries():
    """The paper's ST-motion map: uniform motion (a camera pan) has no boundaries and maps to 0; a
    moving square's boundary cells light up, the cells far from it stay 0."""
    from mmvssl.methods.mcl import st_motion_map
    pan = torch.ones(1, 2, 4, 28, 28)
    assert st_motion_map(pan, 2, (7, 7)).abs().max() == 0
    square = torch.zeros(1, 2, 4, 28, 28)
    square[:, 0, :, 8:16, 8:16] = 2.0  # u = 2 px inside the square
    m = st_motion_map(square, 2, (7, 7))  # (1, 2, 7, 7), 4 px blocks
    assert m.shape == (1, 2, 7, 7)
    assert (m[0, :, 2, 2] > 0).all() and (m[0, :, 5:, 5:] == 0).all()
    assert m[0, 0, 2, 2] == pytest.approx(m[0, 1, 2, 2].item())  # both segments hold 2 frames of it


def test_temporal_focus_draws_among_the_most_moving_half():
    from mmvssl.methods.mcl import motion_focused_start
    energy = torch.tensor([[0.0, 1.0, 9.0, 8.0, 0.0, 0.0, 0.0, 2.0]])  # runs of 2: [1, 10, 17, 8, 0, 0, 2]
    rng = random.Random(0)
    focused = {motion_focused_start(energy, 2, 1.0, rng).item() for _ in range(200)}
    assert focused == {2, 1, 3, 6}  # int(0.5 * 7) + 1 = 4 runs of most motion
    anywhere = {motion_focused_start(energy, 2, 0.0, rng).item() for _ in range(300)}
    assert anywhere == set(range(7))


def test_spatial_focus_crops_over_the_motion_region():
    from mmvssl.methods.mcl import motion_focused_box, motion_region, overlap
    motion = torch.zeros(28, 28)
    motion[16:24, 0:8] = torch.arange(1.0, 65.0).view(8, 8)  # 2 x 2 of the 4 px cells on the 7 x 7 grid, the
    # top 10% (4 cells) without ties: a region of 4 cells, which a crop must cover to 0.9 (get_cor)
    (rows, cols), need = motion_region(motion)
    assert need == pytest.approx(0.9) and rows == (16.0, 24.0) and cols == (0.0, 8.0)
    rng = random.Random(0)
    cover = [overlap(rows, (y, y + 14)) * overlap(cols, (x, x + 14))
             for y, x in (motion_focused_box(motion, 14, rng) for _ in range(100))]
    # a uniform 14 px box covers it to 0.9 in 1 draw of 45 (x = 0, y in 10..14); up to 40 draws
    # find one in 1 - (44/45)^40 = 59% of the boxes, and the best of them covers most otherwise
    assert sum(c >= 0.9 for c in cover) >= 40 and min(cover) >= 0.5


def test_training_the_encoder_on_the_alignment_makes_its_grad_cam_follow_the_motion():
    """The alignment's gradient reaches the encoder through the Grad-CAM (create_graph): a few
    steps on one batch lower the alignment loss."""
    student, method = _mcl(align_weight=1.0)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(4, 2, 3, 4, 32, 32, generator=g)
    motion = torch.zeros(4, 2, 2, 4, 4)
    motion[..., 0:2, 0:2] = 1.0  # the top-left quarter moves
    motion[:, :, 1] *= 3.0  # more in the second segment
    batch = {"video": video, "mcl_motion": motion}
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    aligns = []
    for _ in range(12):
        loss, terms = method(method.embed(student, batch), batch)
        aligns.append(terms["align"].item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert aligns[-1] < 0.8 * aligns[0], aligns


def test_prepare_gives_the_motion_map_on_the_token_grid_and_crops_every_input():
    _, method = _mcl(keep_share=0.5, crop_share=0.5)
    video = torch.zeros(2, 2, 3, 4, 32, 32)
    following = video.clone()
    following[:, :, :, 1, 20:28, 4:12] = 1.0  # motion at frame 1, bottom left
    batch = method.prepare({"video": video, "video_next": following})
    assert batch["video"].shape == batch["video_next"].shape == (2, 2, 3, 2, 32, 32)
    assert batch["mcl_motion"].shape == (2, 2, 1, 4, 4)  # (t, h, w) on the 1 x 4 x 4 tubelet grid
    assert batch["mcl_corners"].shape == (2, 2, 2)


def test_mcl_refuses_cnn_presets_accumulation_and_other_samplers(demo_shards, tmp_path):
    import mmvssl
    from mmvssl.methods.mcl import MCL, MCLOptions
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    with pytest.raises(ConfigError, match="Grad-CAM at the last transformer block"):
        MCL(mmvssl.create_model("mmv-tiny"), MCLOptions(), num_frames=4)
    path = data_path("configs", "methods", "mcl.yaml")
    with pytest.raises(ConfigError, match="train.accum_steps > 1 is not supported"):
        pretrain(tiny_config(path, demo_shards["train"], tmp_path, "train.accum_steps=2"))
    with pytest.raises(ConfigError, match="method 'mcl' contrasts two augmentations"):
        pretrain(tiny_config(path, demo_shards["train"], tmp_path, "data.sampler=cvrl"))
