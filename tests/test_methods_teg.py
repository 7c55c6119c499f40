"""TeG: token times from the views' windows, the dense loss's alignment, the whole method on a batch.
(Training on the demo shards and the falling loss: tests/test_methods.py, over configs/methods/teg.yaml.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmvssl.errors import ConfigError


def test_token_times_are_the_mean_time_of_the_frames_each_token_merges():
    from mmvssl.methods.views import token_times
    # a window [0, 4] s as 4 frames at 0, 1, 2, 3 s; 2 tokens of 2 frames each
    times = token_times(torch.tensor([[0.0, 4.0], [1.0, 3.0]]), num_frames=4, tokens=2)
    torch.testing.assert_close(times, torch.tensor([[0.5, 2.5], [1.25, 2.25]]))
    with pytest.raises(ValueError, match="do not split"):
        token_times(torch.tensor([[0.0, 4.0]]), num_frames=4, tokens=3)


def test_short_clip_tokens_align_to_the_long_clip_token_nearest_in_time():
    from mmvssl.methods.teg import aligned_positions
    from mmvssl.methods.views import token_times
    # long [0, 8] s in 4 tokens of 2 s (times 0.75, 2.75, 4.75, 6.75), short [3, 7] s in 4 tokens
    # (times 3.375, 4.375, 5.375, 6.375): nearest long tokens 1, 2, 2, 3 (by hand)
    long = token_times(torch.tensor([[0.0, 8.0]]), 8, 4)
    short = token_times(torch.tensor([[3.0, 7.0]]), 8, 4)
    assert aligned_positions(short, long).tolist() == [[1, 2, 2, 3]]


def _aligned_example(shift: float):
    """Long-clip features of 3 clips; the short clip's features equal the long clip's at the truly
    aligned times; positives computed from windows whose short clip is moved by `shift` seconds."""
    from mmvssl.methods.teg import aligned_positions
    from mmvssl.methods.views import token_times
    g = torch.Generator().manual_seed(0)
    long = F.normalize(torch.randn(3, 4, 16, generator=g), dim=-1)  # (B, tl, D)
    long_windows = torch.tensor([[0.0, 8.0], [2.0, 10.0], [1.0, 9.0]])
    short_windows = long_windows[:, :1] + torch.tensor([[1.0, 5.0], [0.0, 4.0], [4.0, 8.0]])
    true = aligned_positions(token_times(short_windows, 8, 4), token_times(long_windows, 8, 4))
    short = long[torch.arange(3)[:, None], true]  # (B, ts, D): the long clip's features at the same times
    used = aligned_positions(token_times(short_windows + shift, 8, 4), token_times(long_windows, 8, 4))
    return short, long, true, used


def test_teg_short_tokens_are_at_the_very_times_of_long_tokens_on_the_sampler_grid():
    """Same rate, the short clip a multiple of 4 frames into the long one: each short token's time is a
    long token's time exactly (the positive is at the same time, not the nearest), for tubelets 1, 2, 4."""
    import random

    from mmvssl.data.sampling import view_windows
    from mmvssl.methods.views import token_times
    rng = random.Random(0)
    for _ in range(50):
        (short_start, short_len), (long_start, long_len) = view_windows("teg", 30.0, 2.0, rng, True, long_scale=2.0,
                                                                        fps=4.0)
        assert long_start <= short_start and short_start + short_len <= long_start + long_len + 1e-9
        assert short_len == 2.0 and long_len == 4.0  # 8 and 16 frames at 4 fps: one rate
        offset = (short_start - long_start) * 4.0
        assert abs(offset - round(offset)) < 1e-9 and round(offset) % 4 == 0
        for tubelet in (1, 2, 4):
            short = token_times(torch.tensor([[short_start, short_start + short_len]], dtype=torch.float64), 8,
                                8 // tubelet)
            long = token_times(torch.tensor([[long_start, long_start + long_len]], dtype=torch.float64), 16,
                               16 // tubelet)
            assert (short[0, :, None] - long[0, None, :]).abs().min(dim=1).values.max() < 1e-9


def test_teg_dense_loss_is_lowest_when_times_align():
    from mmvssl.methods.teg import teg_dense_loss
    short, long, true, used = _aligned_example(0.0)
    assert torch.equal(true, used)
    aligned = teg_dense_loss(short, long, used, 0.1).item()
    for shift in (-2.0, 2.0, 4.0):  # one token (2 s) or two later / earlier
        short, long, true, used = _aligned_example(shift)
        assert not torch.equal(true, used)
        shifted = teg_dense_loss(short, long, used, 0.1).item()
        assert shifted > aligned + 1.0, (shift, aligned, shifted)


def test_teg_dense_loss_matches_a_hand_computation():
    from mmvssl.methods.teg import teg_dense_loss
    g = torch.Generator().manual_seed(1)
    short = F.normalize(torch.randn(2, 3, 5, generator=g), dim=-1)
    long = F.normalize(torch.randn(2, 2, 5, generator=g), dim=-1)
    positive = torch.tensor([[0, 1, 1], [1, 0, 0]])
    expected = 0.0
    for b in range(2):
        for k in range(3):
            logits = [float(short[b, k] @ long[c, j]) / 0.5 for c in range(2) for j in range(2)]
            expected += -(logits[b * 2 + positive[b, k]] - torch.logsumexp(torch.tensor(logits), 0).item())
    assert teg_dense_loss(short, long, positive, 0.5).item() == pytest.approx(expected / 6, rel=1e-5)


def _teg(**options):
    import mmvssl
    from mmvssl.methods.teg import TeG, TeGOptions
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    student.frame_features = True
    return student, TeG(TeGOptions(**options), student.output_dims()["video_frames"], num_frames=4, long_frames=8)


def _teg_batch(starts=(0.0, 1.5, 3.0)):
    """Short clips of 4 frames over 2 s, each 1 s (2 frames at 2 fps) into a long clip of 8 frames over 4 s:
    the same rate, as the `teg` sampler gives them."""
    n = len(starts)
    return {"video": torch.randn(n, 1, 3, 4, 32, 32), "video/long": torch.randn(n, 1, 3, 8, 32, 32),
            "view_times": torch.tensor([[[s + 1.0, s + 3.0], [s, s + 4.0]] for s in starts])}


def test_teg_trains_its_dense_head_and_the_student_through_both_terms():
    student, method = _teg()
    batch = _teg_batch()
    loss, terms = method(method.embed(student, batch), batch)
    assert set(terms) == {"dense", "persistent"}
    assert loss.item() == pytest.approx((terms["dense"] + terms["persistent"]).item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.frame_head.parameters())
    assert student.encoders["video"].pos_t.grad.abs().sum() > 0
    _, terms = _teg(clip_weight=0.0)[1](method.embed(student, batch), batch)
    assert set(terms) == {"dense"}  # a term is on when its weight is positive


def test_teg_refuses_a_sampler_without_a_long_and_a_short_clip(demo_shards, tmp_path):
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    cfg = tiny_config(data_path("configs", "methods", "teg.yaml"), demo_shards["train"], tmp_path, "data.sampler=cvrl")
    with pytest.raises(ConfigError, match="method 'teg' matches a short clip inside a long one.*'cvrl'"):
        pretrain(cfg)
    with pytest.raises(ConfigError, match="both 0"):
        _teg(dense_weight=0.0, clip_weight=0.0)


def test_teg_with_feature_cached_accumulation_equals_one_step():
    from accelerate import Accelerator

    from mmvssl.train.step import forward_backward
    batch = _teg_batch((0.0, 1.5, 3.0, 0.5))
    results = []
    for accum in (1, 2):
        student, method = _teg()
        student.eval()  # the encoder's BatchNorm on running statistics: independent of the split
        loss, terms = forward_backward(student, method, batch, Accelerator(cpu=True), accum_steps=accum)
        grads = {n: p.grad.clone() for n, p in [*student.named_parameters(), *method.named_parameters()]
                 if p.grad is not None}
        results.append((loss.item(), {k: v.item() for k, v in terms.items()}, grads))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-5)
    assert set(results[1][2]) == set(results[0][2]) and any(n.startswith("frame_head") for n in results[0][2])
    for n, g in results[0][2].items():
        assert torch.allclose(results[1][2][n], g, atol=1e-5, rtol=1e-4), n


def _dense_inputs():
    g = torch.Generator().manual_seed(2)
    short = F.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    long = F.normalize(torch.randn(4, 2, 8, generator=g), dim=-1)
    return short, long, torch.randint(2, (4, 3), generator=g)


def test_teg_dense_loss_over_two_processes_equals_one_process_on_the_whole_batch(monkeypatch):
    """Two ranks simulated in one process: rank r sees its half of the clips, the gather returns
    every rank's rows (the same tensor, so each rank's backward reaches every row, as the real
    gather's all-reduce does). Each rank's loss is its share of the global mean, and the summed
    gradients, averaged as DDP does, are the global loss's. (The real gather across processes:
    tests/test_distributed.py.)"""
    from mmvssl.losses import contrastive
    from mmvssl.methods import teg
    short, long, positive = _dense_inputs()
    expected_short, expected_long = short.clone().requires_grad_(), long.clone().requires_grad_()
    reference = teg.teg_dense_loss(expected_short, expected_long, positive, 0.2)
    reference.backward()
    all_short, all_long = short.clone().requires_grad_(), long.clone().requires_grad_()
    losses = []
    for rank in range(2):
        rows = slice(rank * 2, rank * 2 + 2)
        everyone = all_long.reshape(8, 8)  # (world * B * tl, D): what the gather of long's rows returns
        monkeypatch.setattr(teg, "world", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(contrastive, "world", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(teg, "gather_with_grad", lambda x, everyone=everyone: everyone)
        monkeypatch.setattr(teg, "gather_no_grad", lambda x: torch.cat([x, x]))
        loss = teg.teg_dense_loss(all_short[rows], all_long[rows], positive[rows], 0.2)
        loss.backward()
        losses.append(loss.item())
    assert sum(losses) / 2 == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(all_short.grad / 2, expected_short.grad)
    torch.testing.assert_close(all_long.grad / 2, expected_long.grad)
