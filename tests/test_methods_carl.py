"""CARL: the sequence contrastive loss's Gaussian target (the loss itself against the official
numbers: tests/parity/carl.py), the method on a batch and under accumulation. (Training on the
demo shards and the falling loss: tests/test_methods.py, over configs/methods/carl.yaml.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmvssl.errors import ConfigError


def _official_inputs(embs: torch.Tensor, positions: list[float]):
    """steps, lengths and masks of CARL's SCL for B videos whose 2 views sit at `positions` frames."""
    B, V, T, _ = embs.shape
    steps = torch.tensor(positions).expand(B, V, T)
    return steps, torch.full((B, V), 100), torch.ones(B, V, T)


def test_carl_target_is_a_gaussian_of_the_variance_over_the_other_view_only():
    """LABEL_VARIENCE is a variance: neighbours one frame apart weigh exp(-1 / (2 var)) of the
    centre; the own view and other videos get no target mass. (The loss and its gradient against
    the official numbers: tests/parity/carl.py.)"""
    from mmvssl.methods.carl import sequence_contrastive_terms
    embs = F.normalize(torch.randn(2, 2, 3, 4), dim=-1)
    steps, lengths, masks = _official_inputs(embs, [0.0, 1.0, 2.0])
    _, label = sequence_contrastive_terms(embs, steps, lengths, masks, label_variance=10.0, temperature=0.1)
    row = label[1]  # video 0, view 0, frame 1: its targets are video 0's view 1, rows 3..5
    assert row[:3].sum() == 0 and row[6:].sum() == 0
    torch.testing.assert_close(row[3:6] / row[4], torch.tensor([math.exp(-1 / 20), 1.0, math.exp(-1 / 20)]))
    torch.testing.assert_close(label.sum(1), torch.ones(12))


def test_optimising_free_embeddings_lowers_carls_loss():
    from mmvssl.methods.carl import sequence_contrastive_loss
    x = torch.randn(2, 2, 4, 8, requires_grad=True)
    steps, lengths, masks = _official_inputs(x, [0.0, 2.0, 4.0, 6.0])
    opt = torch.optim.Adam([x], lr=0.05)
    losses = []
    for _ in range(100):
        loss = sequence_contrastive_loss(F.normalize(x, dim=-1), steps, lengths, masks, 4.0, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::20]


def _carl(**options):
    import mmvssl
    from mmvssl.methods.carl import CARL, CARLOptions
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    student.frame_features = True
    return student, CARL(CARLOptions(**options), student.output_dims()["video_frames"], num_frames=4, fps=4.0)


def _batch(n: int = 4):
    return {"video": torch.randn(n, 2, 3, 4, 32, 32),
            "view_times": torch.tensor([[[s, s + 2.0], [s + 0.5, s + 2.5]] for s in torch.linspace(0, 3, n).tolist()])}


def test_carl_method_is_the_scl_of_its_head_at_frame_positions_and_trains_it():
    from mmvssl.methods.carl import sequence_contrastive_loss
    from mmvssl.methods.views import token_times, view_windows
    student, method = _carl(temperature=0.2, label_variance=3.0)
    batch = _batch()
    embeddings = method.embed(student, batch)
    loss, terms = method(embeddings, batch)
    frames = embeddings["video_frames"].float()
    z = F.normalize(method.frame_head(frames.flatten(0, 2)).view(*frames.shape[:3], -1), dim=-1)
    times = token_times(view_windows(batch), 4, 2)
    torch.testing.assert_close(times[0], torch.tensor([[0.25, 1.25], [0.75, 1.75]], dtype=times.dtype))
    steps = times * 4.0  # frames at data.fps = 4
    expected = sequence_contrastive_loss(z, steps, torch.ones(4, 2), torch.ones(4, 2, 2), 3.0, 0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and terms["scl"] == loss.detach()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.frame_head.parameters())
    with pytest.raises(ConfigError, match="must be > 0"):
        _carl(label_variance=0.0)


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
