"""STC-Mix and CMMC: the cuboid and its kept share by hand, STC-Mix pastes the donor's cuboid, the
soft-target loss by hand, CMMC puts the other stream's tokens of the donor into the host's hidden
layer (and only there), every part trains. (The falling loss on the demo shards:
tests/test_methods.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmvssl.errors import ConfigError


def test_cuboid_sides_and_kept_share():
    from mmvssl.methods.stcmix import cuboid, kept_share
    g = torch.Generator().manual_seed(0)
    box = cuboid((8, 16, 16), lam=1 - 0.125, generator=g)  # (1 - lam)^(1/3) = 0.5 of each side
    assert [s.stop - s.start for s in box] == [4, 8, 8]
    assert all(0 <= s.start and s.stop <= n for s, n in zip(box, (8, 16, 16)))
    assert kept_share((8, 16, 16), box) == pytest.approx(1 - 0.125)
    tiny = cuboid((1, 2, 2), lam=0.99, generator=g)  # at least one cell
    assert kept_share((1, 2, 2), tiny) == pytest.approx(0.75)


def test_stc_mix_pastes_the_donors_cuboid():
    from mmvssl.methods.stcmix import stc_mix
    x = torch.arange(3.0).view(3, 1, 1, 1, 1).expand(3, 2, 4, 8, 8).clone()  # clip b is all b
    box = (slice(1, 3), slice(2, 6), slice(0, 4))
    mixed = stc_mix(x, torch.tensor([1, 2, 0]), box)
    for b, d in enumerate((1, 2, 0)):
        inside = torch.zeros(4, 8, 8, dtype=torch.bool)
        inside[box] = True
        assert (mixed[b][:, inside] == d).all() and (mixed[b][:, ~inside] == b).all()


def test_soft_contrast_by_hand():
    from mmvssl.methods.stcmix import soft_contrast
    g = torch.Generator().manual_seed(1)
    q, k = F.normalize(torch.randn(3, 4, generator=g), dim=1), F.normalize(torch.randn(3, 4, generator=g), dim=1)
    donor = torch.tensor([2, 0, 1])
    expected = 0.0
    for i in range(3):
        logits = [float(q[i] @ k[j]) / 0.1 for j in range(3)]
        log_z = math.log(sum(math.exp(x) for x in logits))
        expected += -(0.7 * (logits[i] - log_z) + 0.3 * (logits[int(donor[i])] - log_z)) / 3
    assert soft_contrast(q, k, donor, 0.7, 0.1).item() == pytest.approx(expected, rel=1e-5)


def _stcmix(**options):
    import mmvssl
    from mmvssl.methods.stcmix import STCMix, STCMixOptions
    from mmvssl.models.multimodal import MultimodalModel
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    motion = MultimodalModel({**student.config, "video": {**student.config["video"], "in_channels": 3}})
    return student, STCMix(student, motion, STCMixOptions(**options))


def test_cmmc_puts_the_donors_other_stream_tokens_in_the_hosts_cuboid():
    """The tokens entering the RGB stream's block mix_layer in its CMMC forward: the donor's motion
    tokens inside the token cuboid, the host's own RGB tokens elsewhere (the aggregation token kept)."""
    from mmvssl.data.motion import temporal_gradient
    student, method = _stcmix(mix_layer=1)
    student.eval()
    method.motion.network.eval()  # BatchNorm on running statistics: the same tokens in every forward
    video = torch.randn(3, 2, 3, 4, 32, 32)
    seen = []
    block = student.encoders["video"].transformer.blocks[1]
    # a forward hook sees the block's input as it entered forward (after the method's pre-hook)
    handle = block.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    torch.manual_seed(5)
    method.embed(student, {"video": video})
    handle.remove()
    donor, lam, token_lam = method.mix
    assert 0 < lam <= 1 and 0 < token_lam < 1 and (donor != torch.arange(3)).all()
    host_tokens = seen[0].unflatten(0, (3, 2))[:, 0]  # the plain forward of both views: view 0
    cmmc_tokens = seen[-1]  # the last RGB forward is the CMMC one
    with torch.no_grad():
        captured = []
        handle = method.motion.network.encoders["video"].transformer.blocks[1].register_forward_pre_hook(
            lambda m, args: captured.append(args[0]))
        method.motion.network({"video": temporal_gradient(video)})
        handle.remove()
    donor_motion = captured[0].unflatten(0, (3, 2))[:, 0][donor]  # (3, 1 + N, width)
    grid = (2, 4, 4)  # 4 frames / 2, 32 px / 8
    # the host's tokens come from a forward of both views (batch 6), the CMMC ones from a batch of 3,
    # the donor's from the motion stream's own forward: the same token through other GEMM shapes may
    # differ in its last float32 bits (|token| < ~1 after one block: < 1e-6); a swapped token differs
    # by ~1, so 1e-5 separates them with margins both ways
    def same(a, b):
        return torch.isclose(a, b, rtol=0, atol=1e-5).all(-1).unflatten(1, grid)  # (3, t, h, w)
    changed = ~same(cmmc_tokens[:, 1:], host_tokens[:, 1:])
    from_donor = same(cmmc_tokens[:, 1:], donor_motion[:, 1:])
    assert changed.any() and torch.equal(changed, from_donor)
    assert changed[0].float().mean().item() == pytest.approx(1 - token_lam)
    torch.testing.assert_close(cmmc_tokens[:, :1], host_tokens[:, :1])


def test_every_stcmix_part_trains():
    student, method = _stcmix()
    batch = {"video": torch.randn(4, 2, 3, 4, 32, 32)}
    loss, terms = method(method.embed(student, batch), batch)
    assert {"cross", "stc", "cmmc"} <= set(terms) and math.isfinite(loss.item())
    loss.backward()
    for name, net in (("rgb", student), ("motion", method.motion.network)):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.encoders["video"].parameters()), name


def test_stcmix_refuses_cnn_presets_and_accumulation(demo_shards, tmp_path):
    import mmvssl
    from mmvssl.methods.stcmix import STCMix, STCMixOptions
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    with pytest.raises(ConfigError, match="mix_layer=5: model 'video-tiny' has 2 blocks"):
        STCMix(student, student, STCMixOptions(mix_layer=5))
    with pytest.raises(ConfigError, match="train.accum_steps > 1 is not supported"):
        pretrain(tiny_config(data_path("configs", "methods", "stcmix.yaml"), demo_shards["train"], tmp_path,
                             "train.accum_steps=2"))
