"""MSCL: a rotated flow turns its vectors with its grid (a valid negative: the same amount of motion
in another direction), rotated motion enters the clip loss as negatives only, the frame-level loss
by hand, motion differential sampling keeps the most moving frames of both views, every part
trains. (The falling loss on the demo shards: tests/test_methods.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmvssl.errors import ConfigError


def _square_frames(shift, T=3, size=16, side=3, x0=4, y0=5):
    """(1, T, size, size) frames of a square moving by shift = (dx, dy) px per frame."""
    frames = torch.zeros(1, T, size, size)
    for t in range(T):
        x, y = x0 + shift[0] * t, y0 + shift[1] * t
        frames[0, t, y:y + side, x:x + side] = 1.0
    return frames


def _centroid(frame):  # (H, W) -> (x, y)
    ys, xs = torch.nonzero(frame, as_tuple=True)
    return xs.float().mean().item(), ys.float().mean().item()


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_rotated_flow_is_the_motion_of_the_rotated_frames(turns):
    from mmvssl.methods.mscl import rotate_motion
    shift = (2, 1)
    frames = torch.rot90(_square_frames(shift), turns, dims=(-2, -1))  # the video turned
    (x0, y0), (x1, y1) = _centroid(frames[0, 0]), _centroid(frames[0, 1])
    flow = torch.zeros(1, 2, 3, 16, 16)
    flow[:, 0], flow[:, 1] = shift[0], shift[1]  # the unturned video's flow: (dx, dy) everywhere
    turned = rotate_motion(flow, torch.tensor([turns]), "flow")
    assert turned[0, 0].unique().tolist() == [pytest.approx(x1 - x0)]
    assert turned[0, 1].unique().tolist() == [pytest.approx(y1 - y0)]


def test_rotated_flow_is_a_valid_negative_same_amount_other_direction():
    from mmvssl.methods.mscl import rotate_motion
    g = torch.Generator().manual_seed(0)
    flow = torch.randn(4, 2, 3, 8, 8, generator=g) + torch.tensor([3.0, 0.0]).view(1, 2, 1, 1, 1)  # mostly rightwards
    turns = torch.tensor([1, 2, 3, 1])
    turned = rotate_motion(flow, turns, "flow")
    magnitude = flow.norm(dim=1)
    for b in range(4):  # the magnitudes are the original's, turned with the grid
        torch.testing.assert_close(turned[b].norm(dim=0), torch.rot90(magnitude[b], int(turns[b]), dims=(-2, -1)))
    mean_direction = turned.mean(dim=(2, 3, 4))  # (B, 2): no longer rightwards
    assert (mean_direction[:, 0] < 1.0).all()
    torch.testing.assert_close(rotate_motion(rotate_motion(turned, 4 - turns, "flow"), torch.zeros(4, dtype=torch.long),
                                             "flow"), flow)  # the remaining turns bring it back
    tgrad = torch.randn(2, 3, 2, 8, 8, generator=g)  # frame differences have no vector channels: only the grid turns
    torch.testing.assert_close(rotate_motion(tgrad, torch.tensor([1, 2]), "tgrad")[1], torch.rot90(tgrad[1], 2, (-2, -1)))


def test_clip_loss_puts_rotated_motion_among_the_negatives_only():
    from mmvssl.methods.mscl import clip_nce
    g = torch.Generator().manual_seed(1)
    rgb, motion, rotated = (F.normalize(torch.randn(3, 8, generator=g), dim=1) for _ in range(3))
    expected = 0.0
    for i in range(3):
        to_motion = [float(rgb[i] @ c) / 0.1 for c in torch.cat([motion, rotated])]  # 6 candidates, positive i
        to_rgb = [float(motion[i] @ c) / 0.1 for c in rgb]
        expected += 0.5 * (-to_motion[i] + math.log(sum(math.exp(x) for x in to_motion))
                           - to_rgb[i] + math.log(sum(math.exp(x) for x in to_rgb))) / 3
    assert clip_nce(rgb, motion, rotated, 0.1).item() == pytest.approx(expected, rel=1e-5)
    # the rotated copy of a clip's own motion, when close to the RGB clip, is a hard negative: the loss rises
    hard = F.normalize(rgb + 0.1 * torch.randn(3, 8, generator=g), dim=1)
    assert clip_nce(rgb, motion, hard, 0.1) > clip_nce(rgb, motion, rotated, 0.1) > clip_nce(rgb, motion, None, 0.1)


def test_frame_loss_by_hand():
    from mmvssl.methods.mscl import local_nce
    g = torch.Generator().manual_seed(2)
    a, b = (F.normalize(torch.randn(2, 3, 4, generator=g), dim=-1) for _ in range(2))  # (B, t, D)
    fa, fb = a.reshape(6, 4), b.reshape(6, 4)
    expected = 0.0
    for i in range(6):  # frame i of the flattened (clip, time) grid: positive = the same (clip, time)
        expected += 0.5 * (-(fa[i] @ fb[i]) / 0.2 + torch.logsumexp(fa[i] @ fb.T / 0.2, 0)
                           - (fb[i] @ fa[i]) / 0.2 + torch.logsumexp(fb[i] @ fa.T / 0.2, 0)) / 6
    assert local_nce(a, b, 0.2).item() == pytest.approx(expected.item(), rel=1e-5)


def _mscl(**options):
    import mmvssl
    from mmvssl.methods.mscl import MSCL, MSCLOptions
    from mmvssl.models.multimodal import MultimodalModel
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    motion = MultimodalModel({**student.config, "video": {**student.config["video"], "in_channels": 3}})
    student.frame_features = motion.frame_features = True
    return student, MSCL(student, motion, MSCLOptions(**options), num_frames=8)


def test_motion_sampling_keeps_the_most_moving_frames_of_both_views():
    _, method = _mscl(keep_share=0.5)
    video = torch.zeros(2, 2, 3, 8, 32, 32)
    video[0, 0, :, 3:7] = torch.randn(3, 4, 32, 32)  # clip 0: frames 3..6 all differ; inside 3..6 three big steps
    video[1, 0, :, 0] = 5.0  # clip 1: one jump, frame 0 -> 1
    video[:, 1] = video[:, 0] + 100 * torch.arange(8.0).view(1, 1, 8, 1, 1)  # view 1: frame index readable
    batch = method.prepare({"video": video.clone()})
    assert batch["mscl_start"].tolist() == [3, 0]
    assert batch["video"].shape == (2, 2, 3, 4, 32, 32)
    for b, start in enumerate((3, 0)):
        torch.testing.assert_close(batch["video"][b], video[b, :, :, start:start + 4])


def test_every_mscl_part_trains():
    student, method = _mscl(keep_share=0.5)
    batch = method.prepare({"video": torch.randn(4, 2, 3, 8, 32, 32)})
    loss, terms = method(method.embed(student, batch), batch)
    assert set(terms) == {"clip", "frame"}
    loss.backward()
    for name, module in (("student", student), ("motion", method.motion.network), ("rgb head", method.rgb_frame_head),
                         ("motion head", method.motion_frame_head)):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name


def test_mscl_refuses_bad_options_and_samplers(demo_shards, tmp_path):
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    with pytest.raises(ConfigError, match="keep_share must be in"):
        _mscl(keep_share=0.0)
    with pytest.raises(ConfigError, match="method 'mscl' pairs RGB and motion"):
        pretrain(tiny_config(data_path("configs", "methods", "mscl.yaml"), demo_shards["train"], tmp_path,
                             "data.sampler=cvrl"))
