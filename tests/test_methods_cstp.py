"""CSTP against its official code (KT27-A/CSTP @ cd68686): the two clips drawn as datasets.py draws them
(one playback rate, a temporal overlap share of 1.0 ... 0.2), every pretext label read back by hand with
upstream's classes, the rotation of each clip, the loss weights (0.1 BYOL with its directions summed,
1 for each pretext term, rate and rotation on both clips), the constant momentum, accumulation and a
few training steps. (The falling loss: tests/test_methods.py; the views: tests/test_views.py.)"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from mmvssl.errors import ConfigError

SHARES = (1.0, 0.8, 0.6, 0.4, 0.2)  # OVERLAP_TEM_RATE and OVERLAP_SPA_RATE upstream


def _cstp(**options):
    import mmvssl
    from mmvssl.methods.cstp import CSTP, CSTPOptions
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    student.frame_features = True
    # 4 frames at 8 fps: a 0.5 s window at rate 1; rates 1, 2, 4, 8 (upstream PACE)
    return student, CSTP(student, CSTPOptions(**options), window=0.5, rates=[1, 2, 4, 8])


def test_the_overlap_sampler_draws_one_rate_and_upstreams_overlap_shares():
    from mmvssl.data.sampling import cstp_rates, overlapping_pair, view_windows
    assert cstp_rates(8.0) == [1, 2, 4, 8] and cstp_rates(2.0) == [1, 2] and cstp_rates(1.0) == [1]
    rates, shares = set(), set()
    for seed in range(300):
        (s1, n1), (s2, n2) = overlapping_pair(3.0, 0.5, random.Random(seed), 8.0)
        assert n1 == n2  # one rate for both clips
        rate = n1 / 0.5
        assert rate in (1, 2, 4)  # 8 x 0.5 s does not fit a 3 s video
        assert 0 <= s1 <= 3.0 - n1 + 1e-9 and 0 <= s2 <= 3.0 - n2 + 1e-9
        share = 1 - abs(s2 - s1) / n1  # the share of the span the clips have in common
        nearest = min(SHARES, key=lambda s: abs(s - share))
        assert share == pytest.approx(nearest, abs=1e-9)
        rates.add(rate), shares.add(nearest)
    assert rates == {1, 2, 4} and shares == set(SHARES)
    # shorter than the span: two equal clips from 0 (upstream: class 0)
    assert overlapping_pair(0.3, 0.5, random.Random(0), 8.0) == [(0.0, 0.5), (0.0, 0.5)]
    assert view_windows("overlap", 3.0, 0.5, random.Random(1), True, long_scale=8.0) == \
        overlapping_pair(3.0, 0.5, random.Random(1), 8.0)


def _batch(windows, crops, B=None):
    video = torch.randn(len(windows), 2, 3, 4, 32, 32)
    return {"video": video, "view_times": torch.tensor(windows, dtype=torch.float64),
            "view_crops": torch.tensor(crops, dtype=torch.float32)}


def test_pretext_labels_by_hand_with_upstreams_classes():
    _, method = _cstp()
    windows = [[[1.0, 2.0], [1.2, 2.2]],  # 1 s = rate 2 (class 1); shares 0.8 of the span: class 1
               [[0.0, 0.5], [0.4, 0.9]],  # rate 1 (class 0); 0.1 / 0.5 = 0.2: class 4
               [[0.0, 4.0], [0.44, 4.44]],  # rate 8 (class 3); 3.56 / 4 = 0.89: nearer 0.8 (class 1)
               [[0.0, 2.0], [0.18, 2.18]]]  # rate 4 (class 2); 1.82 / 2 = 0.91: nearer 1.0 (class 0)
    crops = [[[0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.6, 0.6]],  # 0.4 x 0.4 of 0.5 x 0.5: 0.64, nearest 0.6 (class 2)
             [[0.2, 0.2, 0.6, 0.7], [0.2, 0.2, 0.6, 0.7]],  # the same box: 1.0 (class 0)
             [[0.0, 0.0, 0.5, 1.0], [0.4, 0.0, 0.9, 1.0]],  # 0.1 of 0.5 wide: 0.2 (class 4)
             [[0.5, 0.0, 1.0, 0.5], [0.3, 0.1, 0.8, 0.6]]]  # 0.3 x 0.4 of 0.25: 0.48, nearer 0.4 (class 3)
    batch = _batch(windows, crops)
    torch.manual_seed(0)
    out = method.prepare(dict(batch))
    assert out["cstp_rate"].tolist() == [1, 0, 3, 2]
    assert out["cstp_temporal"].tolist() == [1, 4, 1, 0]
    assert out["cstp_spatial"].tolist() == [2, 0, 4, 3]
    assert torch.equal(out["view_times"], batch["view_times"]) and torch.equal(out["view_crops"], batch["view_crops"])


def test_each_clip_is_rotated_by_its_own_label():
    _, method = _cstp()
    batch = _batch([[[0.0, 0.5], [0.1, 0.6]]] * 16, [[[0.0, 0.0, 1.0, 1.0]] * 2] * 16)
    torch.manual_seed(1)
    out = method.prepare(dict(batch))
    rotation = out["cstp_rotation"]
    assert rotation.shape == (16, 2) and (rotation != rotation[:, :1]).any()  # drawn per clip
    assert set(rotation.flatten().tolist()) == {0, 1, 2, 3}
    for b in range(16):
        for v in range(2):
            k = int(rotation[b, v])  # upstream ROTATE[k]: 0, 90, 180, 270 degrees
            assert torch.equal(out["video"][b, v], torch.rot90(batch["video"][b, v], k, dims=(-2, -1)))


def _zero_heads(method):
    """Pretext heads whose last layer outputs 0: every cross-entropy is ln(classes)."""
    for head in (method.spatial_head, method.temporal_head, method.rate_head, method.rotation_head):
        torch.nn.init.zeros_(head[-1].weight), torch.nn.init.zeros_(head[-1].bias)


def test_loss_weights_are_upstreams_by_hand():
    """main_byol.py: 0.1 BYOL + spatial CE + temporal CE + rate CE on each clip + rotation CE on each clip;
    BYOL (r21d_byol.py _cal_loss): (2 - 2 cos(q_1, z'_2)) + (2 - 2 cos(q_2, z'_1)), mean over clips."""
    student, method = _cstp()
    _zero_heads(method)
    batch = method.prepare(_batch([[[s, s + 0.5], [s + 0.1, s + 0.6]] for s in (0.0, 1.0, 2.0, 3.0)],
                                  [[[0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.6, 0.6]]] * 4))
    embeddings = method.embed(student, batch)
    loss, terms = method(embeddings, batch)
    assert set(terms) == {"byol", "spatial", "temporal", "rate", "rotation"}
    assert terms["spatial"].item() == pytest.approx(math.log(5), rel=1e-6)
    assert terms["temporal"].item() == pytest.approx(math.log(5), rel=1e-6)
    assert terms["rate"].item() == pytest.approx(2 * math.log(4), rel=1e-6)  # both clips, 4 rates
    assert terms["rotation"].item() == pytest.approx(2 * math.log(4), rel=1e-6)  # both clips
    q = F.normalize(method.predictor(embeddings["video_ssl"].flatten(0, 1)), dim=-1).double().view(4, 2, -1)
    z = embeddings["target"].double()
    byol = sum(sum(((q[b, v] - z[b, 1 - v]) ** 2).sum() for v in (0, 1)) for b in range(4)) / 4  # |q - z|^2 = 2 - 2cos
    assert terms["byol"].item() == pytest.approx(byol.item(), rel=1e-5)
    expected = 0.1 * byol.item() + 2 * math.log(5) + 4 * math.log(4)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_a_term_with_weight_zero_is_off():
    student, method = _cstp(byol_weight=0.0, rotation_weight=0.0, spatial_weight=2.0)
    _zero_heads(method)
    batch = method.prepare(_batch([[[0.0, 0.5], [0.1, 0.6]]] * 4, [[[0.0, 0.0, 1.0, 1.0]] * 2] * 4))
    loss, terms = method(method.embed(student, batch), batch)
    assert set(terms) == {"spatial", "temporal", "rate"}
    assert loss.item() == pytest.approx(2 * math.log(5) + math.log(5) + 2 * math.log(4), rel=1e-6)
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        _cstp(byol_weight=0.0, spatial_weight=0.0, temporal_weight=0.0, rate_weight=0.0, rotation_weight=0.0)


def test_target_takes_no_gradient_and_follows_a_constant_momentum():
    student, method = _cstp()
    assert method.o.momentum == 0.996
    heads = [method.predictor, method.spatial_head, method.temporal_head, method.rate_head, method.rotation_head]
    opt = torch.optim.SGD(list(student.parameters()) + [p for h in heads for p in h.parameters()], lr=0.5)
    batch = method.prepare(_batch([[[s, s + 0.5], [s + 0.1, s + 0.6]] for s in (0.0, 1.0, 2.0, 3.0)],
                                  [[[0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.6, 0.6]]] * 4))
    for step in (1, 500):  # the same momentum early and late (upstream: no schedule)
        before = {n: p.clone() for n, p in method.target.named_parameters()}
        opt.zero_grad()
        loss, _ = method(method.embed(student, batch), batch)
        loss.backward()
        assert all(p.grad is None for p in method.target.parameters())
        for head in heads:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
        opt.step()
        method.after_step(student, step)
        assert method.log_values()["momentum"] == 0.996
        for (name, t), s in zip(method.target.named_parameters(), student.parameters()):
            torch.testing.assert_close(t, 0.996 * before[name] + 0.004 * s.detach(), msg=name)


def test_cstp_with_feature_cached_accumulation_equals_one_step():
    from accelerate import Accelerator

    from mmvssl.train.step import forward_backward
    torch.manual_seed(1)
    raw = _batch([[[s, s + 0.5], [s + 0.1, s + 0.6]] for s in (0.0, 1.0, 2.0, 3.0)],
                 [[[0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.6, 0.6]]] * 4)
    results = []
    for accum in (1, 2):
        student, method = _cstp()
        student.eval(), method.eval()  # BatchNorm on running statistics: independent of the split
        torch.manual_seed(2)
        batch = method.prepare(dict(raw))
        loss, terms = forward_backward(student, method, batch, Accelerator(cpu=True), accum_steps=accum)
        grads = {n: p.grad.clone() for n, p in [*student.named_parameters(), *method.named_parameters()]
                 if p.grad is not None}
        results.append((loss.item(), {k: v.item() for k, v in terms.items()}, grads))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-5)
    assert set(results[1][2]) == set(results[0][2]) and not any(n.startswith("target") for n in results[0][2])
    # the split batch sums the same terms in another order; where terms cancel the error scales with the
    # largest gradients, not the element's own: atol is 1e-4 of the largest |gradient|
    scale = max(g.abs().max().item() for g in results[0][2].values())
    for n, g in results[0][2].items():
        assert torch.allclose(results[1][2][n], g, atol=1e-4 * scale, rtol=1e-4), n


def test_cstp_refuses_other_samplers_and_crops_drawn_apart(demo_shards, tmp_path):
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    config = data_path("configs", "methods", "cstp.yaml")
    with pytest.raises(ConfigError, match="method 'cstp' predicts the overlap of two clips.*'cvrl'"):
        pretrain(tiny_config(config, demo_shards["train"], tmp_path, "data.sampler=cvrl"))
    with pytest.raises(ConfigError, match="data.augment.crop_overlap"):
        pretrain(tiny_config(config, demo_shards["train"], tmp_path, "data.augment.crop_overlap=[]"))


def test_cstp_config_trains_a_few_steps_with_every_term(demo_shards, tmp_path):
    import json

    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    pretrain(tiny_config(data_path("configs", "methods", "cstp.yaml"), demo_shards["train"], tmp_path,
                         "train.max_steps=3"))
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    for record in log:
        assert record["momentum"] == 0.996 and all(math.isfinite(record[k]) for k in ("loss", "byol", "spatial",
                                                                                     "temporal", "rate", "rotation"))
