"""ConST-CL: the model's token grid, region features by hand, the instance loss by hand (the most similar
target instance as the positive, the same clip's instances out of the negatives, as tensorflow/models
official/projects/const_cl losses/losses.py), the method on a batch, accumulation, refused configurations. (Training on the demo shards and the falling loss:
tests/test_methods.py, over configs/methods/constcl.yaml.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmvssl.errors import ConfigError


def _constcl(**options):
    import mmvssl
    from mmvssl.methods.constcl import ConSTCL, ConSTCLOptions
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    student.token_features = True
    encoder = student.encoders["video"]
    return student, ConSTCL(ConSTCLOptions(**options), encoder.width, encoder.patch)


def test_model_returns_the_token_grid_per_view_when_asked():
    import mmvssl
    torch.manual_seed(0)
    model = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32}).eval()
    video = torch.randn(2, 2, 3, 4, 32, 32)
    assert "video_tokens" not in model({"video": video})
    model.token_features = True
    with torch.no_grad():
        tokens = model({"video": video})["video_tokens"]
        flat = model.encoders["video"](video.flatten(0, 1))["tokens"]
    assert tokens.shape == (2, 2, 2 * 4 * 4, 128)  # t x h x w = 2 x 4 x 4 tokens of width 128
    torch.testing.assert_close(tokens.flatten(0, 1), flat)


def test_region_features_of_a_box_on_a_constant_block_are_that_block():
    from mmvssl.methods.constcl import region_features
    maps = torch.zeros(2, 3, 4, 4)  # (M, C, h, w)
    maps[0, :, :3, :3] = torch.tensor([1.0, 2.0, 3.0])[:, None, None]  # rows 0-2, columns 0-2 of map 0
    maps[1, :, 2:, 1:] = 5.0  # rows 2-3, columns 1-3 of map 1
    # [x1, y1, x2, y2] in [0, 1]; each box's bilinear samples (cell centres at i + 0.5) stay inside one block
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.875, 0.875, 1.0, 1.0]],
                          [[0.375, 0.625, 0.875, 1.0], [0.0, 0.0, 0.125, 0.125]]])
    got = region_features(maps, boxes, size=2)
    torch.testing.assert_close(got[0, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(got[0, 1], torch.zeros(3))
    torch.testing.assert_close(got[1, 0], torch.full((3,), 5.0))
    torch.testing.assert_close(got[1, 1], torch.zeros(3))


def test_instance_nce_loss_matches_a_hand_computation():
    """ConST-CL's InstanceContrastiveLoss: logits [positive] + the other clips' instances only."""
    from mmvssl.methods.constcl import instance_nce_loss
    g = torch.Generator().manual_seed(0)
    p = F.normalize(torch.randn(2, 3, 5, generator=g), dim=-1)
    q = F.normalize(torch.randn(2, 3, 5, generator=g), dim=-1)
    positive = torch.tensor([[2, 0, 0], [1, 1, 2]])
    expected = 0.0
    for b in range(2):
        for i in range(3):
            pos = float(p[b, i] @ q[b, positive[b, i]]) / 0.2
            negatives = [float(p[b, i] @ q[c, j]) / 0.2 for c in range(2) if c != b for j in range(3)]
            expected += -(pos - torch.logsumexp(torch.tensor([pos, *negatives]), 0).item())
    assert instance_nce_loss(p, q, positive, 0.2).item() == pytest.approx(expected / 6, rel=1e-5)


def test_each_instance_is_matched_to_the_most_similar_target_instance_of_the_other_view():
    """Views of different crops: the instances are matched by their target features, a -> b by the
    argmax over b and b -> a by the argmax over a; a permutation of b's instances moves the positives
    with them and leaves the loss unchanged."""
    from mmvssl.evaluation.metrics import TIE_TOLERANCE
    from mmvssl.methods import constcl
    student, method = _constcl(regions=3)
    student.eval()
    batch = _batch(method)
    seen = []
    real = constcl.instance_nce_loss

    def spy(predicted, target, positive, temperature):
        seen.append((target.detach(), positive))
        return real(predicted, target, positive, temperature)

    constcl.instance_nce_loss = spy
    try:
        embeddings = method.embed(student, batch)
        loss, _ = method(embeddings, batch)
        flipped = {**batch, "constcl_boxes": batch["constcl_boxes"][:, :, [2, 0, 1]]}
        loss_permuted, _ = method(method.embed(student, flipped), flipped)
    finally:
        constcl.instance_nce_loss = real
    (t_b, pos_ab), (t_a, pos_ba) = seen[:2]
    similarity = torch.einsum("bid,bjd->bij", t_a, t_b)  # (B, K_a, K_b) cosines of unit targets
    # tie-aware: each positive is a most similar instance, within TIE_TOLERANCE (float error of the
    # cosines on another kernel); which member of a near-tie the library's argmax picks is not asserted
    assert (similarity.gather(2, pos_ab[..., None]) >= similarity.amax(2, keepdim=True) - TIE_TOLERANCE).all()
    assert (similarity.gather(1, pos_ba[:, None]) >= similarity.amax(1, keepdim=True) - TIE_TOLERANCE).all()
    assert loss_permuted.item() == pytest.approx(loss.item(), rel=1e-5)


def _batch(method, n=4):
    torch.manual_seed(1)
    return method.prepare({"video": torch.randn(n, 2, 3, 4, 32, 32)})


def test_constcl_boxes_are_drawn_per_view_as_constcl_and_every_part_trains():
    student, method = _constcl(regions=3)
    batch = _batch(method, n=64)
    boxes = batch["constcl_boxes"]
    assert boxes.shape == (64, 2, 3, 4) and boxes.min() >= 0 and boxes.max() <= 1 - 1e-3 + 1e-7
    assert not torch.equal(boxes[:, 0], boxes[:, 1])  # each view its own instances
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    inside = (boxes[..., 2] < 1 - 1e-3) & (boxes[..., 3] < 1 - 1e-3)  # not clipped at the frame's edge
    assert width.max() <= 0.5 + 1e-6 and width[inside].min() >= 0.1 - 1e-6
    ratio = height[inside] / width[inside]
    assert ratio.min() >= 0.5 - 1e-5 and ratio.max() <= 2 + 1e-5
    small = _batch(method)
    loss, terms = method(method.embed(student, small), small)
    assert set(terms) == {"region", "clip"}
    loss.backward()
    for part in (method.decoder, method.predict_head, method.target_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert student.encoders["video"].pos_h.grad.abs().sum() > 0


def test_constcl_with_feature_cached_accumulation_equals_one_step():
    from accelerate import Accelerator

    from mmvssl.train.step import forward_backward
    results = []
    for accum in (1, 2):
        student, method = _constcl()
        student.eval()  # the encoder's BatchNorm on running statistics: independent of the split
        loss, _ = forward_backward(student, method, _batch(method), Accelerator(cpu=True), accum_steps=accum)
        results.append((loss.item(), {n: p.grad.clone() for n, p in [*student.named_parameters(),
                                                                     *method.named_parameters()] if p.grad is not None}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert set(results[1][1]) == set(results[0][1]) and any(n.startswith("decoder") for n in results[0][1])
    for n, g in results[0][1].items():
        assert torch.allclose(results[1][1][n], g, atol=1e-5, rtol=1e-4), n


def test_constcl_refuses_a_sampler_without_two_clips(demo_shards, tmp_path):
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    path = data_path("configs", "methods", "constcl.yaml")
    with pytest.raises(ConfigError, match="method 'constcl' relates instances of two clips.*'same'"):
        pretrain(tiny_config(path, demo_shards["train"], tmp_path, "data.sampler=same", "data.num_clips=2"))
    with pytest.raises(ConfigError, match="box_width"):
        _constcl(box_width=[0.0, 0.5])


def test_instance_loss_over_two_processes_equals_one_process_on_the_whole_batch(monkeypatch):
    """Two ranks simulated in one process, as in test_methods_teg: each rank's loss is its share of
    the global mean and the summed gradients, averaged as DDP does, are the global loss's."""
    from mmvssl.losses import contrastive
    from mmvssl.methods import constcl
    g = torch.Generator().manual_seed(3)
    p, q = F.normalize(torch.randn(4, 3, 5, generator=g), dim=-1), F.normalize(torch.randn(4, 3, 5, generator=g), dim=-1)
    ref_p, ref_q = p.clone().requires_grad_(), q.clone().requires_grad_()
    positive = torch.randint(3, (4, 3), generator=g)
    reference = constcl.instance_nce_loss(ref_p, ref_q, positive, 0.2)
    reference.backward()
    all_p, all_q = p.clone().requires_grad_(), q.clone().requires_grad_()
    losses = []
    for rank in range(2):
        rows = slice(rank * 2, rank * 2 + 2)
        everyone = all_q.reshape(12, 5)  # what the gather of the target regions returns
        monkeypatch.setattr(constcl, "world", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(contrastive, "world", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(constcl, "gather_with_grad", lambda x, everyone=everyone: everyone)
        monkeypatch.setattr(constcl, "gather_no_grad", lambda x: torch.cat([x, x]))
        loss = constcl.instance_nce_loss(all_p[rows], all_q[rows], positive[rows], 0.2)
        loss.backward()
        losses.append(loss.item())
    assert sum(losses) / 2 == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(all_p.grad / 2, ref_p.grad)
    torch.testing.assert_close(all_q.grad / 2, ref_q.grad)
