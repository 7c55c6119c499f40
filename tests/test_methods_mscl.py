"""MSCL against the official code (megvii-research/MSCL; the numbers of tests/data/parity/mscl, see
README-motion.md section 2) in the layout the method uses: the flow rotation turns the vectors and
keeps the layout, the frame-level loss on pooled per-time features, rotated frames as negatives;
motion differential sampling draws above the median; every part trains. (The falling loss on the
demo shards: tests/test_methods.py; on cached flow: tests/test_methods_motion_flow.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmvssl.errors import ConfigError

CASES = sorted((Path(__file__).parent / "data" / "parity" / "mscl").glob("case_*.safetensors"))


def _case(path):
    with safe_open(path, "pt") as f:
        return load_file(path), f.metadata()


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_rotation_in_the_methods_layout_is_the_official_one(path):
    """The method's (B, V, 2, T, H, W) flow rotated and normalised as embed does equals the official
    NormFlowWithStidedAug output of the case's chunk id."""
    from mmvssl.methods.mscl import norm_flow, rotate_flow, rotation_angle
    case, meta = _case(path)
    flow = case["flow_in"].permute(3, 0, 1, 2)[None, None]  # (1, 1, 2, T, H, W)
    beta = rotation_angle(case["cid"].view(1), int(meta["num_chunks"])).view(-1, 1, 1, 1, 1)
    assert float(beta) == pytest.approx(float(case["beta"]), abs=1e-12)
    rotated = norm_flow(rotate_flow(flow, beta, dim=2), dim=2, frame_dims=(-2, -1))
    torch.testing.assert_close(rotated[0, 0].permute(1, 2, 3, 0).double(), case["flow_rot_norm"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm_flow(flow, dim=2, frame_dims=(-2, -1))[0, 0].permute(1, 2, 3, 0),
                               case["flow_norm"], rtol=1e-5, atol=1e-6)
    # the layout stays: a pixel's vector length is unchanged by the rotation, only its direction turns
    torch.testing.assert_close(rotate_flow(flow, beta, dim=2).norm(dim=2), flow.norm(dim=2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_frame_loss_on_pooled_per_time_features_is_the_official_one(path):
    """The method feeds (B, width, t) features (the transformer's per-time means, no spatial axes):
    pooling first gives the official loss, scores and targets, rotated frames among the negatives."""
    from mmvssl.methods.mscl import local_motion_loss
    case, meta = _case(path)
    pool = lambda x: x.mean(dim=(-2, -1))  # (b, c, t, h, w) -> (b, c, t)
    scores, labels, loss = local_motion_loss(pool(case["rgb_feat"]), pool(case["flow_feat"]),
                                             pool(case["aug_flow_feat"]))
    torch.testing.assert_close(scores, case["pos_scores"], rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, case["pos_labels"])
    torch.testing.assert_close(loss, case["loss_pos"], rtol=1e-5, atol=1e-6)
    t = int(meta["t"])
    assert scores.shape == (int(meta["b"]) * t, 2 * t)  # the clip's t frames, then its t rotated frames


def test_motion_differential_sampling_draws_only_above_the_median():
    from mmvssl.methods.mscl import median_motion_start
    energy = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 4.0, 0.0, 1.0],  # runs of 3 frames: steps s, s+1
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])  # no run above the median: all drawn
    g = torch.Generator().manual_seed(0)
    seen = [set(), set()]
    for _ in range(200):
        for b, s in enumerate(median_motion_start(energy, 3, g).tolist()):
            seen[b].add(s)
    # run sums over steps (s, s+1) of the 7 runs: [0, 5, 5, 0, 0, 4, 4]; median 4: runs 1 and 2 only
    assert seen[0] == {1, 2}
    assert seen[1] == set(range(7))


def _mscl(**options):
    import mmvssl
    from mmvssl.methods.mscl import MSCL, MSCLOptions
    from mmvssl.models.multimodal import MultimodalModel
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    channels = 2 if options.get("motion", "flow") == "flow" else 3
    motion = MultimodalModel({**student.config, "video": {**student.config["video"], "in_channels": channels}})
    student.frame_features = motion.frame_features = True
    return student, MSCL(student, motion, MSCLOptions(**options), num_frames=8)


def test_temperature_is_the_official_one():
    from mmvssl.config import load_config
    from mmvssl.methods.mscl import MSCLOptions
    from mmvssl.resources import data_path
    assert MSCLOptions().temperature == 0.07
    assert load_config(data_path("configs", "methods", "mscl.yaml")).method.options.temperature == 0.07


def test_motion_sampling_keeps_one_run_for_both_views_and_their_next_frames():
    _, method = _mscl(motion="tgrad", rotation=False, keep_share=0.5)
    video = torch.zeros(2, 2, 3, 8, 32, 32)
    video[:, 1] = video[:, 0] + 100 * torch.arange(8.0).view(1, 1, 8, 1, 1)  # frame index readable
    following = video.clone()
    following[0, :, :, 3:5] += 1.0  # clip 0 moves at frames 3, 4 only: runs of 4 starting 1..3 hold both
    batch = method.prepare({"video": video.clone(), "video_next": following})
    start = batch["mscl_start"].tolist()
    assert start[0] in (1, 2, 3) and batch["video"].shape == (2, 2, 3, 4, 32, 32)
    for b, s in enumerate(start):
        torch.testing.assert_close(batch["video"][b], video[b, :, :, s:s + 4])
        torch.testing.assert_close(batch["video_next"][b], following[b, :, :, s:s + 4])


@pytest.mark.parametrize("options", [{"motion": "flow"}, {"motion": "tgrad", "rotation": False}])
def test_every_mscl_part_trains(options):
    student, method = _mscl(keep_share=0.5, **options)
    batch = {"video": torch.randn(4, 2, 3, 8, 32, 32)}
    if options["motion"] == "flow":
        batch["flow"] = 3 * torch.randn(4, 2, 2, 8, 32, 32)
    else:
        batch["video_next"] = batch["video"] + 0.1 * torch.randn(4, 2, 3, 8, 32, 32)
    batch = method.prepare(batch)
    loss, terms = method(method.embed(student, batch), batch)
    assert set(terms) == {"rgb", "motion", "cross", "frame"}
    loss.backward()
    for name, module in (("student", student), ("motion", method.motion.network)):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name


def test_mscl_refuses_bad_options_and_samplers(demo_shards, tmp_path):
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    with pytest.raises(ConfigError, match="keep_share must be in"):
        _mscl(keep_share=0.0)
    with pytest.raises(ConfigError, match="rotation turns flow vectors"):
        _mscl(motion="tgrad", rotation=True)
    with pytest.raises(ConfigError, match="method 'mscl' pairs RGB and motion"):
        pretrain(tiny_config(data_path("configs", "methods", "mscl.yaml"), demo_shards["train"], tmp_path,
                             "data.sampler=cvrl"))
