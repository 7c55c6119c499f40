"""MCL: Grad-CAM by hand, the alignment loss is lower when the map matches the motion and falls as
the encoder is trained to align it, motion-focused sampling picks the moving box and frames, the
alignment reaches the encoder through the Grad-CAM. (The falling loss on the demo shards:
tests/test_methods.py.)"""

from __future__ import annotations

import pytest
import torch

from mmvssl.errors import ConfigError


def _mcl(**options):
    import mmvssl
    from mmvssl.methods.mcl import MCL, MCLOptions
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    return student, MCL(student, MCLOptions(**options), num_frames=4)


def test_grad_cam_by_hand():
    from mmvssl.methods.mcl import grad_cam
    A = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.0, 1.0]]])  # (1, L=3, C=2)
    G = torch.tensor([[[0.5, -1.0], [1.0, 0.0], [0.0, 1.0]]])
    alpha = [0.5, 0.0]  # the gradient's mean over the 3 tokens, per channel
    expected = [max(0.0, A[0, i, 0].item() * alpha[0] + A[0, i, 1].item() * alpha[1]) for i in range(3)]
    torch.testing.assert_close(grad_cam(A, G)[0], torch.tensor(expected))


def test_alignment_loss_is_zero_when_the_map_matches_the_motion_and_grows_with_the_mismatch():
    from mmvssl.methods.mcl import alignment_loss

    def block(y, x):
        m = torch.zeros(2, 2, 6, 6)
        m[:, :, y:y + 2, x:x + 2] = 3.0
        return m
    motion = block(1, 1)  # the moving 2 x 2 block
    assert alignment_loss(2 * motion, motion).item() == pytest.approx(0.0)  # the scale does not matter
    half = alignment_loss(block(1, 2), motion)  # shifted by one: 4 of 36 cells differ
    apart = alignment_loss(block(3, 3), motion)  # disjoint: 8 differ
    assert half.item() == pytest.approx(4 / 36) and apart.item() == pytest.approx(8 / 36)


def test_training_the_encoder_on_the_alignment_makes_its_grad_cam_follow_the_motion():
    """The alignment's gradient reaches the encoder through the Grad-CAM (create_graph): a few
    steps on one batch lower the alignment loss."""
    student, method = _mcl(align_weight=1.0)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(4, 2, 3, 4, 32, 32, generator=g)
    motion = torch.zeros(4, 2, 2, 4, 4)
    motion[..., 0:2, 0:2] = 1.0  # the top-left quarter moves
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


def test_alignment_gradient_reaches_the_encoder():
    student, method = _mcl(align_weight=1.0)
    batch = {"video": torch.randn(3, 2, 3, 4, 32, 32), "mcl_motion": torch.rand(3, 2, 2, 4, 4)}
    loss, terms = method(method.embed(student, batch), batch)
    align = loss - terms["nt_xent"]  # the alignment term, in the graph (terms are detached)
    align_grads = torch.autograd.grad(align, list(student.encoders["video"].transformer.parameters()),
                                      allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in align_grads)


def test_motion_focused_sampling_picks_the_moving_box_and_frames():
    _, method = _mcl(keep_share=0.5, crop_share=0.5)
    video = torch.zeros(2, 2, 3, 4, 32, 32)
    video[:, :, :, 2, 20:28, 4:12] = 1.0  # a block appears at frame 2 only: motion 1->2 and 2->3, bottom left
    batch = method.prepare({"video": video.clone()})
    assert batch["video"].shape == (2, 2, 3, 2, 32, 32)
    assert batch["mcl_start"].tolist() == [1, 1]  # frames 1, 2: the step 1 -> 2 lies inside
    y, x = batch["mcl_corners"][0, 0].tolist()
    assert 12 <= y <= 20 and 0 <= x <= 4  # a 16 px box holding the 8 px block
    assert batch["mcl_motion"].shape == (2, 2, 1, 4, 4)  # (t, h, w) on the 2 x 8 x 8 tubelet grid
    assert batch["video"][0, 0, 0, 1].max() == pytest.approx(1.0)  # the block is in the kept frame


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
