"""ConCur: the share of the video the positives may span grows with the step, set on the loader by the
method and resumed with the stream; the distance head's target is the drawn distance's bin. (The views
of the shipped config through `mmvssl views`: tests/test_views.py.)"""

from __future__ import annotations

import pytest
import torch

from mmvssl.resources import data_path
from tests.conftest import read_jsonl
from tests.test_methods import tiny_config


def _method(**options):
    from mmvssl.methods.concur import ConCur, ConCurOptions
    return ConCur(ConCurOptions(**{"head_hidden": 16, **options}), width=8, max_steps=100)


def test_span_grows_linearly_with_the_step_then_stays():
    method = _method(span_start=0.2, curriculum=0.5)  # the whole video at step 50
    assert [method.span(s) for s in (0, 25, 50, 99)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    spans = [method.span(s) for s in range(101)]
    assert spans == sorted(spans)


def test_the_method_sets_its_curriculum_on_the_loader_spec_and_the_spec_follows_the_batch():
    from mmvssl.data.loader import SampleSpec
    spec = SampleSpec(sampler="concur", curriculum_steps=50, span_start=0.2)
    assert [spec.span_share(b) for b in (0, 25, 50, 80)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert SampleSpec(sampler="concur").span_share(0) == 1.0  # no curriculum: the whole video


def test_distance_labels_are_the_bins_of_the_share_of_the_video_between_the_clips():
    from mmvssl.methods.concur import distance_labels
    # 2 s clips in 10 s videos: 8 s of room; d = 0, 1, 4.1, 8 s -> shares 0, 1/8, 0.5125, 1 -> bins of 8: 0, 1, 4, 7
    windows = torch.tensor([[[0.0, 2.0], [0.0, 2.0]], [[1.0, 3.0], [2.0, 4.0]], [[0.0, 2.0], [4.1, 6.1]],
                            [[0.0, 2.0], [8.0, 10.0]]])
    assert distance_labels(windows, torch.full((4,), 10.0), 8).tolist() == [0, 1, 4, 7]
    assert distance_labels(windows[:1], torch.tensor([2.0]), 8).tolist() == [0]  # no room to move


def test_distance_head_reads_the_pair_and_is_trained_by_the_drawn_distance():
    method = _method()
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
    with pytest.raises(ConfigError, match="span_start .* are shares"):
        _method(span_start=1.5)
    with pytest.raises(ConfigError, match="distance_bins"):
        _method(distance_bins=0)


def test_concur_span_and_losses_resume_exactly(demo_shards, tmp_path, monkeypatch):
    """4 steps straight, and the same run stopped by SIGINT during step 2 and resumed: the same span
    at every step (a quarter of the video more each step here), the same losses and the same head."""
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
    assert [r["span"] for r in a] == [0.25, 0.5, 0.75, 1.0]  # the share after each step, over 4 steps
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["span"] == y["span"], x["step"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7), x["step"]
        assert x["distance"] == pytest.approx(y["distance"], rel=1e-6, abs=1e-7), x["step"]
