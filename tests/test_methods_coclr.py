"""CoCLR: positives mined from the other stream's neighbours, the multi-instance InfoNCE by hand,
the phase schedule, the frozen stream takes no gradient and does not move in training, the two
queues filled at the same rows. (The falling loss on the demo shards: tests/test_methods.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmvssl.errors import ConfigError
from mmvssl.resources import data_path


def _coclr(**options):
    import mmvssl
    from mmvssl.methods.coclr import CoCLR, CoCLROptions
    from mmvssl.models.multimodal import MultimodalModel
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    motion = MultimodalModel({**student.config, "video": {**student.config["video"], "in_channels": 3}})
    return student, CoCLR(student, motion, CoCLROptions(**options))


def test_mined_positives_are_the_other_streams_nearest_queue_entries():
    from mmvssl.methods.coclr import mine_positives
    g = torch.Generator().manual_seed(0)
    queue = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    key = F.normalize(torch.randn(2, 8, generator=g), dim=1)
    queue[3] = key[0]  # clip 0's neighbours: rows 3 and 7
    queue[7] = F.normalize(key[0] + 0.05 * torch.randn(8, generator=g), dim=0)
    queue[1] = key[1]  # clip 1's: rows 1 and 5
    queue[5] = F.normalize(key[1] + 0.05 * torch.randn(8, generator=g), dim=0)
    mask = mine_positives(key, queue, topk=2)
    assert mask.shape == (2, 11)
    assert mask[0].nonzero().flatten().tolist() == [0, 4, 8]  # own key + queue rows 3, 7 (columns shift by 1)
    assert mask[1].nonzero().flatten().tolist() == [0, 2, 6]


def test_same_video_entries_are_positives_and_kept_out_of_the_mining():
    """CoCLR's mask_source: queue rows of the clip's own source video are positives whatever their
    similarity, the top-k is drawn from the other videos' rows, and before the queue is full only the
    own key and the same-video rows are positives. (The official numbers: tests/parity/coclr.py.)"""
    from mmvssl.methods.coclr import drop_self, mine_positives, same_video_mask
    g = torch.Generator().manual_seed(0)
    queue = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    key = F.normalize(torch.randn(1, 8, generator=g), dim=1)
    queue[2] = key[0]  # the nearest row, but of the clip's own video
    queue[4] = F.normalize(key[0] + 0.1 * torch.randn(8, generator=g), dim=0)  # the nearest of another video
    same = same_video_mask(torch.tensor([7]), torch.tensor([1, 1, 7, -1, 3, 7]))
    assert same.tolist() == [[False, False, True, False, False, True]]
    assert mine_positives(key, queue, 1, same).nonzero()[:, 1].tolist() == [0, 3, 5, 6]  # own, 2, 4, 5
    assert mine_positives(key, queue, 1, same, queue_full=False).nonzero()[:, 1].tolist() == [0, 3, 6]
    assert same_video_mask(torch.tensor([-2]), torch.tensor([-2, 0])).sum() == 0  # unknown videos never match
    # self-masking drops the own key only where another positive remains
    positives = torch.tensor([[True, True, False], [True, False, False]])
    assert drop_self(positives).tolist() == [[False, True, False], [True, False, False]]


def test_video_ids_come_from_the_data_and_are_shared_by_clips_of_one_source():
    from mmvssl.methods.coclr import video_ids
    batch = {"key": ["000_000", "000_001", "001", "002"],
             "meta": [{"source": "a.mp4", "clip_index": 0}, {"source": "a.mp4", "clip_index": 1},
                      {"source": "b.mp4", "video_id": "g08"}, {}]}
    ids = video_ids(batch)
    assert ids.dtype == torch.long and (ids >= 0).all()
    assert ids[0] == ids[1] and len({int(ids[1]), int(ids[2]), int(ids[3])}) == 3
    assert video_ids({"key": ["x"], "meta": [{"source": "c.mp4", "video_id": "g08"}]})[0] == ids[2]  # video_id first
    assert torch.equal(video_ids(batch), ids)  # the same in every call (and process)


def test_multi_instance_nce_by_hand_and_moco_infonce_with_one_positive():
    from mmvssl.methods.coclr import multi_instance_nce
    g = torch.Generator().manual_seed(1)
    q, k = F.normalize(torch.randn(3, 4, generator=g), dim=1), F.normalize(torch.randn(3, 4, generator=g), dim=1)
    queue = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    positives = torch.zeros(3, 6, dtype=torch.bool)
    positives[:, 0] = True
    positives[0, 2] = positives[2, 5] = True
    expected = 0.0
    for i in range(3):
        logits = [float(q[i] @ k[i]) / 0.1] + [float(q[i] @ queue[j]) / 0.1 for j in range(5)]
        total = sum(math.exp(x) for x in logits)
        expected += -math.log(sum(math.exp(x) for x, p in zip(logits, positives[i]) if p) / total) / 3
    assert multi_instance_nce(q, k, queue, positives, 0.1).item() == pytest.approx(expected, rel=1e-5)
    own = positives.clone()
    own[:, 1:] = False
    moco = F.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.1, torch.zeros(3, dtype=torch.long))
    assert multi_instance_nce(q, k, queue, own, 0.1).item() == pytest.approx(moco.item(), rel=1e-5)


@pytest.mark.parametrize("drop", [False, True])
def test_rgb_phase_loss_uses_positives_from_the_motion_streams_neighbours(drop, monkeypatch):
    from mmvssl.methods import coclr
    from mmvssl.methods.coclr import drop_self, mine_positives, multi_instance_nce
    monkeypatch.setattr(coclr, "SELF_MASK_PROBABILITY", 1.0 if drop else 0.0)
    _, method = _coclr(queue_size=12, topk=1, init_steps=0, cycle_steps=5)
    assert method.phase() == "rgb"
    g = torch.Generator().manual_seed(2)
    D = method.queue_rgb.shape[1]
    rgb_key, motion_key = (F.normalize(torch.randn(4, D, generator=g), dim=1) for _ in range(2))
    query = F.normalize(torch.randn(4, D, generator=g), dim=1)
    # queue rows 0-3 hold the clips' neighbours in the motion stream, rows 8-11 in the RGB stream
    method.queue_motion[:4] = motion_key
    method.queue_rgb[8:] = rgb_key
    method.queue_video.fill_(coclr.UNKNOWN_VIDEO)  # a full queue of other videos: mining is on
    loss, terms = method({"rgb_query": query, "rgb_key": rgb_key, "motion_key": motion_key}, {})
    assert set(terms) == {"rgb_nce"}
    positives = mine_positives(motion_key, method.queue_motion, 1)
    assert [p.nonzero().flatten().tolist() for p in positives] == [[0, 1 + i] for i in range(4)]  # motion's rows 0-3
    positives = drop_self(positives) if drop else positives
    expected = multi_instance_nce(query, rgb_key, method.queue_rgb, positives, method.o.temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    from_rgb = multi_instance_nce(query, rgb_key, method.queue_rgb, mine_positives(rgb_key, method.queue_rgb, 1),
                                  method.o.temperature)
    assert abs(loss.item() - from_rgb.item()) > 1e-3


def test_the_self_masking_draw_is_a_function_of_seed_and_step_so_a_resumed_run_repeats_it():
    """The own key is dropped in 90% of the steps (main_coclr.py); the draw of step s comes from a
    generator seeded by (seed, s): a method resumed from another's state after step 2 draws at steps 3
    and 4 what the uninterrupted one drew, whatever torch's global generator holds, and forward drops
    the own key exactly at the steps drawn so."""
    from mmvssl.methods.coclr import drop_self, mine_positives, multi_instance_nce, self_mask_draw
    _, uninterrupted = _coclr(queue_size=12, topk=1, init_steps=0, cycle_steps=1000)
    draws = {}
    for step in (1, 2, 3, 4):
        uninterrupted.step.fill_(step - 1)  # steps taken before this one
        torch.manual_seed(100 + step)  # other users of the global generator in between
        draws[step] = uninterrupted.drops_own_key()
        if step == 2:  # the checkpoint after step 2 (after_step has counted it)
            uninterrupted.step.fill_(2)
            state = {k: v.clone() for k, v in uninterrupted.state_dict().items()}
    _, resumed = _coclr(queue_size=12, topk=1, init_steps=0, cycle_steps=1000)
    resumed.load_state_dict(state)
    torch.manual_seed(7)
    for step in (3, 4):
        assert int(resumed.step) == step - 1
        assert resumed.drops_own_key() == draws[step]
        resumed.step.fill_(step)
    assert draws == {s: self_mask_draw(0, s) for s in (1, 2, 3, 4)}
    # the probability: 2000 steps within 4.5 standard deviations of 0.9; another seed draws otherwise
    share = sum(self_mask_draw(0, s) for s in range(1, 2001)) / 2000
    assert abs(share - 0.9) < 4.5 * math.sqrt(0.9 * 0.1 / 2000)
    assert [self_mask_draw(1, s) for s in range(1, 101)] != [self_mask_draw(0, s) for s in range(1, 101)]
    # forward uses it: at a kept step the own key stays a positive, at a dropped step it leaves
    kept = next(s for s in range(1, 500) if not self_mask_draw(0, s))
    dropped = next(s for s in range(1, 500) if self_mask_draw(0, s))
    g = torch.Generator().manual_seed(4)
    D = uninterrupted.queue_rgb.shape[1]
    rgb_key, motion_key, query = (F.normalize(torch.randn(4, D, generator=g), dim=1) for _ in range(3))
    uninterrupted.queue_video.fill_(-2)  # a full queue of other videos: mining is on
    positives = mine_positives(motion_key, uninterrupted.queue_motion, 1)
    for step, expected_positives in ((kept, positives), (dropped, drop_self(positives))):
        uninterrupted.step.fill_(step - 1)
        torch.manual_seed(step)
        loss, _ = uninterrupted({"rgb_query": query, "rgb_key": rgb_key, "motion_key": motion_key}, {})
        expected = multi_instance_nce(query, rgb_key, uninterrupted.queue_rgb, expected_positives,
                                      uninterrupted.o.temperature)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    other = multi_instance_nce(query, rgb_key, uninterrupted.queue_rgb, drop_self(positives), uninterrupted.o.temperature)
    kept_loss = multi_instance_nce(query, rgb_key, uninterrupted.queue_rgb, positives, uninterrupted.o.temperature)
    assert abs(other.item() - kept_loss.item()) > 1e-3  # the two cases are told apart


def test_the_frozen_streams_key_encoder_keeps_its_batchnorm_statistics():
    """CoCLR's sampler runs in eval mode: in an RGB phase the motion key encoder's BatchNorm
    statistics stay; in the init phase (both streams train) they move."""
    student, method = _coclr(queue_size=16, init_steps=1, cycle_steps=5)
    stats = [n for n, b in method.motion_key_encoder.named_buffers() if "running_mean" in n]
    assert stats, "the tiny preset has BatchNorm (stem / head)"
    video = torch.randn(4, 2, 3, 4, 32, 32)
    for step, moves in ((1, False), (0, True)):
        method.step.fill_(step)
        before = {n: b.clone() for n, b in method.motion_key_encoder.named_buffers()}
        method.embed(student.train(), {"video": video})
        after = dict(method.motion_key_encoder.named_buffers())
        assert any(not torch.equal(before[n], after[n]) for n in stats) is moves


def test_phases_follow_the_steps_taken():
    _, method = _coclr(init_steps=2, cycle_steps=3)
    assert [method.phase(s) for s in range(11)] == ["init"] * 2 + ["rgb"] * 3 + ["motion"] * 3 + ["rgb"] * 3


@pytest.mark.parametrize("phase_step,rgb,motion", [(0, True, True), (2, True, False), (3, False, True)])
def test_the_stream_that_mines_takes_no_gradient(phase_step, rgb, motion):
    student, method = _coclr(queue_size=16, init_steps=2, cycle_steps=1)
    method.step.fill_(phase_step)
    loss, terms = method(method.embed(student, {"video": torch.randn(4, 2, 3, 4, 32, 32)}), {})
    loss.backward()
    def reached(net):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert reached(student) is rgb and reached(method.motion.network) is motion
    assert not reached(method.rgb_key_encoder) and not reached(method.motion_key_encoder)
    assert set(terms) == {f"{s}_nce" for s, on in (("rgb", rgb), ("motion", motion)) if on}


def test_both_queues_take_the_keys_at_the_same_rows_and_wrap():
    _, method = _coclr(queue_size=5)
    a, b = torch.randn(3, 128), torch.randn(3, 128)
    method.enqueue(a, -a, torch.tensor([0, 1, 2]))
    assert not method.queue_full()
    method.enqueue(b, -b, torch.tensor([3, 4, 5]))
    assert int(method.queue_ptr) == 1 and method.queue_full()
    assert method.queue_video.tolist() == [5, 1, 2, 3, 4]
    torch.testing.assert_close(method.queue_rgb[[0, 1, 2, 3, 4]], torch.cat([b[2:], a[1:], b[:2]]))
    torch.testing.assert_close(method.queue_motion, -method.queue_rgb)


def test_coclr_alternation_moves_only_the_trained_stream(demo_shards, tmp_path):
    """6 steps through the engine (2 init, then RGB, RGB, motion, motion): the checkpoints show the
    motion stream unchanged over the RGB phase and the RGB model unchanged over the motion phase."""
    from safetensors.torch import load_file

    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    from tests.conftest import read_jsonl
    cfg = tiny_config(data_path("configs", "methods", "coclr.yaml"), demo_shards["train"], tmp_path,
                      "train.max_steps=6", "train.save_every=1", "train.keep_last=6", "method.options.init_steps=2",
                      "method.options.cycle_steps=2", "method.options.queue_size=32")
    pretrain(cfg)
    ckpt = {s: tmp_path / "checkpoints" / f"step_{s:08d}" for s in (2, 4, 6)}
    model = {s: load_file(str(p / "model.safetensors")) for s, p in ckpt.items()}
    method = {s: load_file(str(p / "method.safetensors")) for s, p in ckpt.items()}
    motion = {s: {k: v for k, v in m.items() if k.startswith("motion.network.")} for s, m in method.items()}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)
    assert same(motion[2], motion[4]) and not same(model[2], model[4])  # steps 3-4: RGB trained, motion mines
    assert same(model[4], model[6]) and not same(motion[4], motion[6])  # steps 5-6: motion trained, RGB mines
    assert int(method[6]["queue_ptr"]) == (6 * cfg.data.batch_size) % 32
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["phase"] for r in log] == [0, 0, 1, 1, 2, 2]
    assert all("rgb_nce" in r and "motion_nce" in r for r in log[:2])
    assert all("rgb_nce" in r and "motion_nce" not in r for r in log[2:4])


def test_coclr_refuses_views_other_than_query_and_key(demo_shards, tmp_path):
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    with pytest.raises(ConfigError, match="method 'coclr' contrasts a query and a key view"):
        pretrain(tiny_config(data_path("configs", "methods", "coclr.yaml"), demo_shards["train"], tmp_path,
                             "data.sampler=cvrl"))
    with pytest.raises(ConfigError, match="queue_size, topk and cycle_steps must be positive"):
        _coclr(topk=0)


@pytest.mark.parametrize("phase_step", [0, 2])
def test_optimising_coclr_against_a_full_queue_lowers_its_loss(phase_step):
    """The loss learns: the queue filled with the key encoder's keys of other clips, a few Adam steps
    on one batch lower the trained stream's loss (InfoNCE in the init phase, the mined
    multi-instance loss in an RGB phase)."""
    student, method = _coclr(queue_size=16, topk=2, init_steps=2, cycle_steps=5, temperature=0.1)
    g = torch.Generator().manual_seed(3)
    others = torch.randn(16, 2, 3, 4, 32, 32, generator=g)
    with torch.no_grad():
        keys = method.embed(student, {"video": others})
    method.enqueue(keys["rgb_key"], keys["motion_key"])
    method.step.fill_(phase_step)
    params = list(student.parameters()) + list(method.motion.network.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    batch = {"video": torch.randn(8, 2, 3, 4, 32, 32, generator=g)}
    losses = []
    for _ in range(8):
        loss, _ = method(method.embed(student, batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
