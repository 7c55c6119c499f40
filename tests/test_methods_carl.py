"""CARL: the sequence contrastive loss by hand, its time prior, the method on a batch and under
accumulation. (Training on the demo shards and the falling loss: tests/test_methods.py, over
configs/methods/carl.yaml.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmvssl.errors import ConfigError


def test_carl_loss_equals_a_hand_computation_with_explicit_loops():
    from mmvssl.methods.carl import sequence_contrastive_loss
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(2, 3, 4, generator=g), dim=-1)  # (B, ta, D)
    b = F.normalize(torch.randn(2, 4, 4, generator=g), dim=-1)  # (B, tb, D)
    times_a = torch.tensor([[0.5, 1.5, 2.5], [0.0, 1.0, 2.0]])
    times_b = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.25, 0.75, 1.25, 1.75]])
    sigma, tau = 0.8, 0.3
    total = 0.0
    for n in range(2):
        for i in range(3):
            weights = [math.exp(-(float(times_a[n, i]) - float(times_b[n, j])) ** 2 / (2 * sigma ** 2)) for j in range(4)]
            prior = [w / sum(weights) for w in weights]
            sims = [float(a[n, i] @ b[n, j]) / tau for j in range(4)]
            q = [math.exp(s) / sum(math.exp(x) for x in sims) for s in sims]
            total += sum(p * (math.log(p) - math.log(qj)) for p, qj in zip(prior, q))
    expected = total / 6
    got = sequence_contrastive_loss(a, b, times_a, times_b, sigma, tau).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_carl_time_prior_is_normalised_and_optimising_embeddings_lowers_the_loss():
    from mmvssl.methods.carl import sequence_contrastive_loss, time_prior
    times = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    prior = time_prior(times, times, 1.0)
    torch.testing.assert_close(prior.sum(-1), torch.ones(1, 4))
    assert prior[0, 1].argmax() == 1 and prior[0, 1, 0] == pytest.approx(prior[0, 1, 2])  # symmetric in distance
    z = F.normalize(torch.randn(1, 4, 8), dim=-1)
    assert sequence_contrastive_loss(z, z, times, times, 1.0, 0.1).item() > 0.01
    # optimising free embeddings (both views the same) on the loss lowers it
    x = torch.randn(1, 4, 8, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05)
    first = None
    for _ in range(200):
        e = F.normalize(x, dim=-1)
        loss = sequence_contrastive_loss(e, e, times, times, 1.0, 0.5)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def _carl(**options):
    import mmvssl
    from mmvssl.methods.carl import CARL, CARLOptions
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    student.frame_features = True
    return student, CARL(CARLOptions(**options), student.output_dims()["video_frames"], num_frames=4)


def _batch(n: int = 4):
    return {"video": torch.randn(n, 2, 3, 4, 32, 32),
            "view_times": torch.tensor([[[s, s + 2.0], [s + 0.5, s + 2.5]] for s in torch.linspace(0, 3, n).tolist()])}


def test_carl_method_is_the_symmetric_loss_of_its_head_and_trains_it():
    from mmvssl.methods.carl import sequence_contrastive_loss
    from mmvssl.methods.views import token_times, view_windows
    student, method = _carl(temperature=0.2, sigma=0.5)
    batch = _batch()
    embeddings = method.embed(student, batch)
    loss, terms = method(embeddings, batch)
    frames = embeddings["video_frames"].float()
    z = F.normalize(method.frame_head(frames.flatten(0, 2)).view(*frames.shape[:3], -1), dim=-1)
    times = token_times(view_windows(batch), 4, 2)
    torch.testing.assert_close(times[0], torch.tensor([[0.25, 1.25], [0.75, 1.75]]))  # frames at 0, .5, 1, 1.5 s
    expected = 0.5 * (sequence_contrastive_loss(z[:, 0], z[:, 1], times[:, 0], times[:, 1], 0.5, 0.2)
                      + sequence_contrastive_loss(z[:, 1], z[:, 0], times[:, 1], times[:, 0], 0.5, 0.2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and terms["scl"] == loss.detach()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.frame_head.parameters())
    with pytest.raises(ConfigError, match="must be > 0"):
        _carl(sigma=0.0)


def test_carl_with_feature_cached_accumulation_equals_one_step():
    from accelerate import Accelerator

    from mmvssl.train.step import forward_backward
    batch = _batch()
    results = []
    for accum in (1, 2):
        student, method = _carl()
        student.eval()  # the encoder's BatchNorm on running statistics: independent of the split
        loss, _ = forward_backward(student, method, batch, Accelerator(cpu=True), accum_steps=accum)
        results.append((loss.item(), {n: p.grad.clone() for n, p in [*student.named_parameters(),
                                                                     *method.named_parameters()] if p.grad is not None}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert set(results[1][1]) == set(results[0][1]) and any(n.startswith("frame_head") for n in results[0][1])
    for n, g in results[0][1].items():
        assert torch.allclose(results[1][1][n], g, atol=1e-5, rtol=1e-4), n


def test_carl_refuses_a_sampler_without_two_views(demo_shards, tmp_path):
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    cfg = tiny_config(data_path("configs", "methods", "carl.yaml"), demo_shards["train"], tmp_path, "data.sampler=teg")
    with pytest.raises(ConfigError, match="method 'carl' aligns the frames of two views: data.sampler 'teg'"):
        pretrain(cfg)
