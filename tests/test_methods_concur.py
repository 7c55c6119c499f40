"""ConCur: the span between positives grows with the step and resumes at the same value; the clips
are cut where the draws say; the distance head's target is the drawn distance."""

from __future__ import annotations

import pytest
import torch

from mmvssl.resources import data_path
from tests.conftest import read_jsonl
from tests.test_methods import tiny_config


def _method(**options):
    from mmvssl.methods.concur import ConCur, ConCurOptions
    return ConCur(ConCurOptions(**{"clip_frames": 4, "head_hidden": 16, **options}), width=8, num_frames=12,
                  max_steps=100, seed=3)


def test_span_grows_linearly_with_the_step_then_stays():
    method = _method(span_start=2, curriculum=0.5)  # span_end: 12 - 4 = 8, reached at step 50
    assert [method.span(s) for s in (0, 10, 25, 49, 50, 99)] == [2, 3, 5, 7, 8, 8]  # 2 + int(6 * s / 50)
    spans = [method.span(s) for s in range(101)]
    assert spans == sorted(spans) and spans[0] == 2 and spans[-1] == 8


def test_draws_stay_within_the_span_and_fit_the_window():
    from mmvssl.methods.concur import draw_pairs
    for span in (0, 3, 8):
        first, distance = draw_pairs(512, 12, 4, span, seed=0, step=7)
        assert distance.min() >= 0 and distance.max() == span  # 512 draws reach the bound
        assert first.min() >= 0 and (first + distance + 4).max() <= 12
    a, b = draw_pairs(16, 12, 4, 5, seed=0, step=7), draw_pairs(16, 12, 4, 5, seed=0, step=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # a step's draws do not depend on the run
    c = draw_pairs(16, 12, 4, 5, seed=0, step=8)
    assert not torch.equal(a[0], c[0]) or not torch.equal(a[1], c[1])


def test_clips_are_cut_at_the_drawn_frames_of_each_view():
    from mmvssl.methods.concur import cut_clips, draw_pairs
    B, T = 6, 12
    frame = torch.arange(float(T)).view(1, 1, 1, T, 1, 1)
    view = 100 * torch.arange(2.0).view(1, 2, 1, 1, 1, 1)
    video = (frame + view).expand(B, 2, 3, T, 8, 8).clone()  # every pixel holds 100 x view + frame index
    method = _method(span_start=8)  # the whole window from the start
    batch = method.prepare({"video": video, "view_times": torch.tensor([[[0.0, 6.0], [0.0, 6.0]]] * B)})
    first, distance = draw_pairs(B, T, 4, 8, seed=3, step=0)
    assert torch.equal(batch["concur_distance"], distance)
    expected_a = first[:, None] + torch.arange(4.0)  # (B, 4) frame indices of view 0's clip
    assert torch.equal(batch["video"][:, 0, 0, :, 0, 0], expected_a)
    assert torch.equal(batch["video"][:, 1, 0, :, 0, 0], 100 + expected_a + distance[:, None])
    # the clips' windows: 0.5 s a frame, 4 frames each
    torch.testing.assert_close(batch["view_times"][:, 0], torch.stack([first * 0.5, first * 0.5 + 2.0], -1).float())
    torch.testing.assert_close(batch["view_times"][:, 1, 0], ((first + distance) * 0.5).float())


def test_distance_head_reads_the_pair_and_is_trained_by_the_drawn_distance():
    method = _method(span_start=8)
    B = 8
    clips = torch.nn.functional.normalize(torch.randn(B, 2, 5), dim=-1)
    frames = torch.randn(B, 2, 3, 8, requires_grad=True)
    batch = {"concur_distance": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])}
    loss, terms = method({"video_ssl": clips, "video_frames": frames}, batch)
    pooled = frames.mean(2)
    logits = method.distance_head(torch.cat([pooled[:, 0], pooled[:, 1], pooled[:, 0] * pooled[:, 1],
                                             (pooled[:, 0] - pooled[:, 1]).abs()], -1))
    expected = torch.nn.functional.cross_entropy(logits, batch["concur_distance"])
    torch.testing.assert_close(terms["distance"], expected.detach())
    torch.testing.assert_close(loss.detach(), terms["nt_xent"] + expected.detach())
    loss.backward()
    assert frames.grad.abs().sum() > 0 and method.distance_head[0].weight.grad.abs().sum() > 0


def test_bad_options_are_one_line_errors():
    from mmvssl.errors import ConfigError
    with pytest.raises(ConfigError, match="clip_frames 20 must be 1..data.num_frames"):
        _method(clip_frames=20)
    with pytest.raises(ConfigError, match="span_start"):
        _method(span_start=9)


def test_concur_span_and_losses_resume_exactly(demo_shards, tmp_path, monkeypatch):
    """4 steps straight, and the same run stopped by SIGINT during step 2 and resumed: the same span
    at every step (it grows by one frame a step here), the same losses and the same head."""
    import signal

    from mmvssl.methods import concur
    from mmvssl.train.engine import pretrain
    path = data_path("configs", "methods", "concur.yaml")
    extra = ("train.max_steps=4", "method.options.curriculum=1.0", "method.options.span_start=0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(tiny_config(path, demo_shards["train"], straight, *extra))
    calls, real = [], concur.nt_xent_loss

    def signalling(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(concur, "nt_xent_loss", signalling)
    assert pretrain(tiny_config(path, demo_shards["train"], split, *extra)).name == "step_00000002"
    monkeypatch.setattr(concur, "nt_xent_loss", real)
    pretrain(tiny_config(path, demo_shards["train"], split, *extra, "train.resume=latest"))
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(split / "metrics.jsonl")
    assert [r["span"] for r in a] == [1.0, 2.0, 3.0, 4.0]  # span_end 4 (8 - 4) over 4 steps, after each step
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["span"] == y["span"], x["step"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7), x["step"]
        assert x["distance"] == pytest.approx(y["distance"], rel=1e-6, abs=1e-7), x["step"]
