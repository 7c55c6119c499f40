"""CSTP: the overlap target by hand, the BYOL views left untransformed and the playback-rate and
rotation copies made in `prepare` for the heads alone, the BYOL target (no gradient, the EMA of the online network), accumulation. (Training on the demo
shards and the falling loss: tests/test_methods.py, over configs/methods/cstp.yaml.)"""

from __future__ import annotations

import pytest
import torch

from mmvssl.errors import ConfigError


def _cstp(**options):
    import mmvssl
    from mmvssl.methods.cstp import CSTP, CSTPOptions
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    student.frame_features = True
    return student, CSTP(student, CSTPOptions(**options), num_frames=4, max_steps=10)


def _indexed_batch(windows):
    """Views whose every pixel holds its frame index (0..3), frames distinct per view and clip."""
    B = len(windows)
    frame = torch.arange(4.0).view(1, 1, 1, 4, 1, 1)
    clip = 100 * torch.arange(B).view(B, 1, 1, 1, 1, 1) + 10 * torch.arange(2).view(1, 2, 1, 1, 1, 1)
    return {"video": (frame + clip).expand(B, 2, 3, 4, 32, 32).clone(), "view_times": torch.tensor(windows, dtype=torch.float64)}


def test_cstp_overlap_target_is_the_temporal_iou_of_the_windows_by_hand():
    from mmvssl.methods.views import temporal_iou
    # [0, 2] and [1, 3]: intersection 1, union 3; [0, 2] and [2, 4]: touching, 0; [1, 3] inside [0, 4]: 2 / 4
    iou = temporal_iou(torch.tensor([[0.0, 2.0], [0.0, 2.0], [1.0, 3.0]]), torch.tensor([[1.0, 3.0], [2.0, 4.0], [0.0, 4.0]]))
    torch.testing.assert_close(iou, torch.tensor([1 / 3, 0.0, 0.5]))
    _, method = _cstp(strides=[1])  # stride 1 keeps every frame: the windows as sampled
    batch = method.prepare(_indexed_batch([[[0.0, 2.0], [1.0, 3.0]], [[0.5, 2.5], [3.0, 5.0]]]))
    torch.testing.assert_close(batch["cstp_overlap"], torch.tensor([1 / 3, 0.0]))


def test_byol_views_are_untransformed_and_the_pretext_copies_carry_rate_and_rotation():
    """CSTP's pretext transformations go to copies that only the heads see: the BYOL views are each clip
    at the slowest rate over its whole window, never rotated; each copy keeps the frames its stride says,
    from its offset, and the second copy is rotated by its label. The copies' windows follow the frames."""
    _, method = _cstp(strides=[1, 2])
    windows = [[[0.0, 2.0], [1.0, 3.0]], [[0.0, 4.0], [1.0, 5.0]], [[2.0, 4.0], [2.5, 4.5]], [[0.0, 2.0], [0.0, 2.0]]] * 4
    original = _indexed_batch(windows)
    torch.manual_seed(3)
    batch = method.prepare({**original, "video": original["video"].clone()})
    assert batch["video"].shape == (16, 2, 3, 2, 32, 32)  # 4 frames -> keep 2 at stride 2
    assert torch.equal(batch["video"], original["video"][:, :, :, ::2])  # frames 0 and 2: no rate, no rotation
    copies = batch["video/pretext"]
    strides_seen, rotations = set(), set()
    for b, clip in enumerate(windows):
        k = int(batch["cstp_rotation"][b])
        rotations.add(k)
        for v, (start, end) in enumerate(clip):
            copy = copies[b, v] if v == 0 else torch.rot90(copies[b, v], -k, dims=(-2, -1))  # undo the rotation
            kept = [int(copy[0, f, 5, 5].item()) % 10 for f in range(2)]  # the frame indices kept
            stride = kept[1] - kept[0]
            assert stride == method.strides[int(batch["cstp_rate"][b, v])]
            strides_seen.add(stride)
            dt = (end - start) / 4
            expected = [start + kept[0] * dt, start + (kept[0] + 2 * stride) * dt]
            torch.testing.assert_close(batch["view_times"][b, 2 + v].float(), torch.tensor(expected))
    assert strides_seen == {1, 2} and len(rotations) > 1
    torch.testing.assert_close(batch["view_times"][:, :2], original["view_times"])  # the clips' windows first


def test_the_overlap_target_is_the_clips_not_the_copies():
    _, method = _cstp(strides=[1, 2])
    windows = [[[0.0, 2.0], [1.0, 3.0]], [[0.0, 2.0], [1.5, 3.5]]] * 8
    torch.manual_seed(4)
    batch = method.prepare(_indexed_batch(windows))
    torch.testing.assert_close(batch["cstp_overlap"], torch.tensor([1 / 3, 0.5 / 3.5] * 8))


def test_cstp_rotates_the_second_copy_by_its_label():
    _, method = _cstp(strides=[1])
    torch.manual_seed(0)
    video = torch.randn(8, 2, 3, 4, 32, 32)
    batch = method.prepare({"video": video.clone(), "view_times": torch.tensor([[[0.0, 2.0], [1.0, 3.0]]] * 8)})
    torch.testing.assert_close(batch["video"], video)  # stride 1 keeps every frame: the BYOL views as decoded
    torch.testing.assert_close(batch["video/pretext"][:, 0], video[:, 0])
    for b in range(8):
        k = int(batch["cstp_rotation"][b])
        torch.testing.assert_close(batch["video/pretext"][b, 1], torch.rot90(video[b, 1], k, dims=(-2, -1)))
    assert len(set(batch["cstp_rotation"].tolist())) > 1


def test_cstp_target_takes_no_gradient_and_is_the_ema_of_the_online_network():
    student, method = _cstp(momentum_start=0.9, momentum_end=1.0)
    heads = [method.predictor, method.overlap_head, method.rate_head, method.rotation_head]
    opt = torch.optim.SGD(list(student.parameters()) + [p for h in heads for p in h.parameters()], lr=0.5)
    batch = method.prepare({"video": torch.randn(4, 2, 3, 4, 32, 32),
                            "view_times": torch.tensor([[[s, s + 2.0], [s + 0.5, s + 2.5]] for s in (0.0, 1.0, 2.0, 3.0)])})
    before = {n: p.clone() for n, p in method.target.named_parameters()}
    loss, terms = method(method.embed(student, batch), batch)
    assert set(terms) == {"byol", "overlap", "rate", "rotation"}
    loss.backward()
    assert all(p.grad is None for p in method.target.parameters())
    for head in heads:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    opt.step()
    method.after_step(student, 1)
    m = method.momentum(0)
    assert m == pytest.approx(0.9)
    for (name, t), s in zip(method.target.named_parameters(), student.parameters()):
        torch.testing.assert_close(t, m * before[name] + (1 - m) * s.detach(), msg=name)
    assert method.momentum(10) == pytest.approx(1.0) and 0.9 < method.momentum(5) < 1.0  # the cosine


def test_cstp_with_feature_cached_accumulation_equals_one_step():
    from accelerate import Accelerator

    from mmvssl.train.step import forward_backward
    torch.manual_seed(1)
    raw = {"video": torch.randn(4, 2, 3, 4, 32, 32),
           "view_times": torch.tensor([[[s, s + 2.0], [s + 0.5, s + 2.5]] for s in (0.0, 1.0, 2.0, 3.0)])}
    results = []
    for accum in (1, 2):
        student, method = _cstp()
        student.eval()  # the encoder's BatchNorm on running statistics: independent of the split
        torch.manual_seed(2)
        batch = method.prepare(dict(raw))
        loss, terms = forward_backward(student, method, batch, Accelerator(cpu=True), accum_steps=accum)
        grads = {n: p.grad.clone() for n, p in [*student.named_parameters(), *method.named_parameters()]
                 if p.grad is not None}
        results.append((loss.item(), {k: v.item() for k, v in terms.items()}, grads))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-5)
    assert set(results[1][2]) == set(results[0][2]) and not any(n.startswith("target") for n in results[0][2])
    # the split batch sums the same terms in another order; where terms cancel (predictor.0.bias feeds a
    # BatchNorm, so its exact gradient is 0 and its float value is rounding noise of ~1e-5 here), the error
    # scales with the largest gradients, not the element's own: atol is 1e-4 of the largest |gradient|
    # (one thread: 1.1e-5 seen against 8e-5 allowed; a real accumulation error is of the gradient's size)
    scale = max(g.abs().max().item() for g in results[0][2].values())
    for n, g in results[0][2].items():
        assert torch.allclose(results[1][2][n], g, atol=1e-4 * scale, rtol=1e-4), n


def test_cstp_refuses_a_sampler_without_two_clips_and_bad_strides(demo_shards, tmp_path):
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    cfg = tiny_config(data_path("configs", "methods", "cstp.yaml"), demo_shards["train"], tmp_path, "data.sampler=same",
                      "data.num_clips=2")
    with pytest.raises(ConfigError, match="method 'cstp' predicts the overlap of two clips.*'same'"):
        pretrain(cfg)
    with pytest.raises(ConfigError, match="strides must be positive"):
        _cstp(strides=[8])


def test_cstp_overlap_target_multiplies_the_temporal_and_the_crop_iou_by_hand():
    from mmvssl.methods.views import box_iou
    _, method = _cstp(strides=[1])
    batch = _indexed_batch([[[0.0, 2.0], [1.0, 3.0]], [[0.0, 2.0], [0.0, 2.0]]])
    batch["view_crops"] = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.25, 0.0, 0.75, 1.0]],  # x overlap 0.25 of 0.75: 1/3
                                        [[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]]])  # 1/16 of 7/16: 1/7
    batch = method.prepare(batch)
    torch.testing.assert_close(batch["cstp_overlap"], torch.tensor([1 / 3 * 1 / 3, 1.0 * 1 / 7]))
    assert box_iou(torch.tensor([0.0, 0.0, 0.5, 0.5]), torch.tensor([0.5, 0.5, 1.0, 1.0])).item() == 0.0


def test_augmenter_records_its_crop_and_gives_the_frames_of_its_composed_transform():
    import random

    from torchvision import tv_tensors

    from mmvssl.data.augment import Augmenter, AugmentOptions
    H, W = 100, 200
    frames = torch.zeros(2, H, W, 3, dtype=torch.uint8)
    frames[..., 0] = (torch.arange(W) * 255 // (W - 1)).to(torch.uint8)[None, None, :]  # red ramps with x
    frames[..., 1] = (torch.arange(H) * 255 // (H - 1)).to(torch.uint8)[None, :, None]  # green ramps with y
    plain = Augmenter(AugmentOptions(video=True, flip=0.0, jitter_p=0.0, grayscale=0.0), 32)
    for seed in range(4):
        out, (x0, y0, x1, y1) = plain.video_and_crop(frames, random.Random(seed))
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        cell_x, cell_y = (x1 - x0) * 255 / 32, (y1 - y0) * 255 / 32  # ramp steps per output pixel
        assert abs(out[0, 0, 0, 0].item() - x0 * 255) <= cell_x + 3 and abs(out[0, 0, -1, 0].item() - x1 * 255) <= cell_x + 3
        assert abs(out[0, 0, 0, 1].item() - y0 * 255) <= cell_y + 3 and abs(out[0, -1, 0, 1].item() - y1 * 255) <= cell_y + 3
    full = Augmenter(AugmentOptions(video=True, blur=0.5), 32)  # every transform on: the frames are Compose's
    for seed in range(4):
        out, _ = full.video_and_crop(frames, random.Random(seed))
        rng = random.Random(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(62))
            expected = full.video_transform(tv_tensors.Video(frames.permute(0, 3, 1, 2)))
        assert torch.equal(out, expected.permute(0, 2, 3, 1))
        assert torch.equal(full.video(frames, random.Random(seed)), out)


def test_loader_records_each_views_crop(demo_shards):
    from mmvssl.config import load_config
    from mmvssl.data.loader import build_loader
    from mmvssl.data.options import sample_spec
    from mmvssl.resources import data_path
    from tests.test_methods import TINY
    cfg = load_config(data_path("configs", "methods", "cstp.yaml"), TINY)
    batch = next(iter(build_loader(str(demo_shards["train"]), sample_spec(cfg.data, train=True, seed=0), 4,
                                   num_workers=0)))
    crops = batch["view_crops"]  # (B, V, 4)
    assert crops.shape == (4, 2, 4) and crops.min() >= 0 and crops.max() <= 1
    assert (crops[..., 2:] > crops[..., :2]).all() and not torch.equal(crops[:, 0], crops[:, 1])
    cfg.data.augment.video = False
    batch = next(iter(build_loader(str(demo_shards["train"]), sample_spec(cfg.data, train=True, seed=0), 4,
                                   num_workers=0)))
    assert torch.equal(batch["view_crops"], torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(4, 2, 4))
