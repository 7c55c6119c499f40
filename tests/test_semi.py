"""Semi-supervised methods tg and cmpl: FixMatch's confidence mask, cross-model pseudo-labels, the
strong view, what is trained, checkpointed and shipped, and an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmvssl.resources import data_path


def test_a_pseudo_label_below_the_threshold_contributes_nothing():
    from mmvssl.methods.pseudo_label import confident_pseudo_labels, masked_cross_entropy
    probs = torch.tensor([[0.96, 0.02, 0.02], [0.5, 0.3, 0.2], [0.01, 0.01, 0.98]])
    labels, mask = confident_pseudo_labels(probs, 0.95)
    assert labels.tolist() == [0, 0, 2] and mask.tolist() == [True, False, True]
    logits = torch.randn(3, 3, requires_grad=True)
    loss = masked_cross_entropy(logits, labels, mask)
    expected = (F.cross_entropy(logits[0:1], labels[0:1]) + F.cross_entropy(logits[2:3], labels[2:3])) / 3
    torch.testing.assert_close(loss, expected)  # FixMatch: divided by every unlabelled sample
    loss.backward()
    assert torch.equal(logits.grad[1], torch.zeros(3)) and logits.grad[0].abs().sum() > 0
    none = masked_cross_entropy(logits, labels, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0


def _tg(threshold=0.9, **options):
    from mmvssl.methods.tg import TG, TGOptions
    options = {"align_weight": 0.0, "contrast_weight": 0.0, **options}
    return TG(TGOptions(task="demo", threshold=threshold, **options), tg_net=None, width=4)


def _embeddings(rgb, tg, pooled=None):
    pooled = torch.randn(rgb.shape[0], 2, 4) if pooled is None else pooled
    return {"rgb_logits": rgb, "tg_logits": tg, "rgb_pooled": pooled, "tg_pooled": pooled,
            "rgb_contrast": pooled[:, 0], "tg_contrast": pooled[:, 0]}


def test_tg_pseudo_labels_from_both_weak_views_supervise_both_strong_views_when_confident():
    method = _tg(threshold=0.9)
    K = 3
    rgb = torch.zeros(3, 2, K, requires_grad=True)  # (B, weak/strong, K)
    tg = torch.zeros(3, 2, K, requires_grad=True)
    with torch.no_grad():
        rgb[1, 0] = torch.tensor([8.0, 0.0, 0.0])  # unlabelled, confident with TG: class 0
        tg[1, 0] = torch.tensor([6.0, 0.0, 0.0])
        rgb[2, 0] = torch.tensor([8.0, 0.0, 0.0])  # unlabelled, RGB confident but TG disagrees: the mean is not
        tg[2, 0] = torch.tensor([0.0, 8.0, 0.0])
    batch = {"labels": torch.tensor([2, -1, -1])}
    loss, terms = method(_embeddings(rgb, tg), batch)
    # by hand, with the official cls_loss_weight 0.5: labelled CE of sample 0 for each stream (uniform
    # logits: ln 3 each), and for sample 1 the strong views' CE against class 0 (ln 3 each) over the 2
    # unlabelled samples
    expected_sup = 0.5 * 2 * torch.log(torch.tensor(3.0))
    expected_pseudo = 0.5 * 2 * torch.log(torch.tensor(3.0)) / 2
    torch.testing.assert_close(terms["ce_labelled"], expected_sup)
    torch.testing.assert_close(terms["ce_pseudo"], expected_pseudo)
    assert terms["pseudo_label_share"].item() == pytest.approx(0.5)  # 1 of the 2 unlabelled samples passed
    loss.backward()
    assert rgb.grad[1, 1].abs().sum() > 0 and tg.grad[1, 1].abs().sum() > 0  # confident: strong views learn
    assert torch.equal(rgb.grad[2, 1], torch.zeros(K)) and torch.equal(tg.grad[2, 1], torch.zeros(K))
    assert torch.equal(rgb.grad[1:, 0], torch.zeros(2, K))  # the weak views make targets, they take no gradient


def test_tg_threshold_is_the_official_0_3():
    from mmvssl.config import load_config
    from mmvssl.methods.tg import TGOptions
    assert TGOptions().threshold == 0.3
    assert load_config(data_path("configs", "methods", "tg.yaml")).method.options.threshold == 0.3
    # softmax of the mean logits [1, 0, 0] over 3 classes: e / (e + 2) = 0.576 passes 0.3 (not 0.95)
    method = _tg(threshold=0.3)
    weak = torch.tensor([[1.0, 0.0, 0.0]])
    logits = torch.stack([weak, weak], dim=1)  # (1, 2, 3)
    _, terms = method(_embeddings(logits, logits), {"labels": torch.tensor([-1])})
    assert terms["pseudo_label_share"].item() == 1.0


def test_tg_unlabelled_loss_waits_for_the_warm_up():
    method = _tg(threshold=0.5, unlabelled_warmup=3)
    rgb = torch.zeros(2, 2, 3, requires_grad=True)
    with torch.no_grad():
        rgb[:, 0] = torch.tensor([9.0, 0.0, 0.0])  # both unlabelled samples confident
    batch = {"labels": torch.tensor([-1, -1])}
    for done, active in ((0, False), (2, False), (3, True)):  # steps finished before this one
        method.steps_done.fill_(done)
        rgb.grad = None
        loss, terms = method(_embeddings(rgb, rgb), batch)
        loss.backward()
        assert terms["pseudo_label_share"].item() == 1.0  # counted during the warm-up too
        assert (rgb.grad[:, 1].abs().sum() > 0) == active and (terms["ce_pseudo"].item() > 0) == active
    assert "steps_done" in method.state_dict()  # a resumed run keeps its place in the warm-up


def test_tg_input_is_the_official_uint8_temporal_gradient_of_consecutive_frames():
    """The loader's normalised frames and the frames right after them -> the TG stream's input equals
    the official uint8 maps of tests/data/parity/tg, normalised as the loader normalises RGB."""
    from safetensors.torch import load_file

    from mmvssl.data.loader import normalize_video
    from mmvssl.methods.tg import tg_input, to_uint8
    case = load_file(Path(__file__).parent / "data" / "parity" / "tg" / "case_2.safetensors")
    frames, inds = case["frames_rgb"], case["frame_inds_1based"] - 1
    video = normalize_video(frames[inds].permute(3, 0, 1, 2))  # (3, T, H, W) as collate gives it
    video_next = normalize_video(frames[inds + 1].permute(3, 0, 1, 2))  # the next raw frame of each
    assert torch.equal(to_uint8(video), frames[inds].permute(3, 0, 1, 2))
    official = case["tg_sampled_rgb"].permute(3, 0, 1, 2)  # (3, T, H, W) uint8
    assert torch.equal(tg_input(video, video_next), normalize_video(official))
    # 1/fps apart instead (the next *sampled* frame) gives other maps: the spacing matters
    assert not torch.equal(tg_input(video[:, :-1], video[:, 1:]), normalize_video(official[:, :-1]))


def test_tg_contrast_is_the_official_term_on_the_heads_of_both_weak_streams():
    from mmvssl.methods.tg import crossview_contrast_loss, feature_alignment_loss
    method = _tg(threshold=0.9, contrast_weight=1.0, align_weight=1.0)
    torch.manual_seed(0)
    logits = torch.zeros(4, 2, 3)
    rgb_c, tg_c = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    pooled_rgb, pooled_tg = torch.randn(4, 2, 4, requires_grad=True), torch.randn(4, 2, 4, requires_grad=True)
    emb = {"rgb_logits": logits, "tg_logits": logits, "rgb_pooled": pooled_rgb, "tg_pooled": pooled_tg,
           "rgb_contrast": rgb_c, "tg_contrast": tg_c}
    loss, terms = method(emb, {"labels": torch.tensor([0, 1, -1, -1])})
    contrast, ab, ba = crossview_contrast_loss(rgb_c, tg_c, 0.5)
    torch.testing.assert_close(terms["contrast"], contrast.detach())
    torch.testing.assert_close(contrast, 0.5 * (ab + ba))
    # by hand: CE of row i of the normalised rgb x tg^T / 0.5 against column i
    a, b = F.normalize(rgb_c, dim=1), F.normalize(tg_c, dim=1)
    torch.testing.assert_close(ab, F.cross_entropy(a @ b.T / 0.5, torch.arange(4)))
    torch.testing.assert_close(terms["align"], feature_alignment_loss(pooled_rgb[:, 0], pooled_tg[:, 0]).detach())
    loss.backward()
    assert rgb_c.grad.abs().sum() > 0 and tg_c.grad.abs().sum() > 0  # the contrast trains both streams' heads
    assert pooled_tg.grad is None or torch.equal(pooled_tg.grad, torch.zeros_like(pooled_tg))  # alignment: TG detached
    assert pooled_rgb.grad[:, 0].abs().sum() > 0


def test_cmpl_the_auxiliary_networks_pseudo_labels_supervise_the_main_one_and_not_itself():
    from mmvssl.methods.cmpl import cross_pseudo_losses
    K = 3
    main = torch.zeros(2, 2, K, requires_grad=True)
    aux = torch.zeros(2, 2, K, requires_grad=True)
    with torch.no_grad():
        aux[0, 0] = torch.tensor([0.0, 9.0, 0.0])  # aux confident on sample 0: class 1
        main[1, 0] = torch.tensor([0.0, 0.0, 9.0])  # main confident on sample 1: class 2
        main[0, 1] = torch.tensor([1.0, 2.0, 3.0])
        aux[1, 1] = torch.tensor([3.0, 1.0, 0.0])
        aux[1, 0] = torch.tensor([0.0, 3.0, 0.0])  # aux on sample 1: e^3 / (e^3 + 2) = 0.909, below 0.95
    main_loss, aux_loss, shares = cross_pseudo_losses(main, aux, threshold=0.95)
    assert shares["pseudo_label_share"].item() == 0.5  # the aux's labels for the main net: 1 of 2 passed
    assert shares["pseudo_label_share_aux"].item() == 0.5  # the main net's labels for the aux: 1 of 2
    torch.testing.assert_close(main_loss, F.cross_entropy(main[0:1, 1], torch.tensor([1])) / 2)
    torch.testing.assert_close(aux_loss, F.cross_entropy(aux[1:2, 1], torch.tensor([2])) / 2)
    main_loss.backward(retain_graph=True)
    assert aux.grad is None or torch.equal(aux.grad, torch.zeros_like(aux))  # the main loss trains the main net only
    assert main.grad[0, 1].abs().sum() > 0 and torch.equal(main.grad[:, 0], torch.zeros(2, K))
    # the main network's own confident prediction (sample 1) is no target for itself
    assert torch.equal(main.grad[1, 1], torch.zeros(K))


def test_strong_view_keeps_the_shape_and_one_cutout_box_through_time():
    from mmvssl.methods.pseudo_label import strong_augment
    torch.manual_seed(0)
    video = torch.randn(2, 3, 4, 16, 16)
    a = strong_augment(video, jitter=0.0, grayscale=0.0, cutout=0.5)
    assert a.shape == video.shape
    from mmvssl.data.loader import VIDEO_MEAN, VIDEO_STD
    grey = ((0.5 - VIDEO_MEAN) / VIDEO_STD).view(1, 3, 1, 1, 1)
    box = (a - grey).abs().amax(dim=1) < 1e-5  # (B, T, H, W): the cutout pixels
    assert box[:, 0].sum() > 0 and torch.equal(box[:, 0], box[:, 3])  # the same box in every frame
    outside = ~box[:, None].expand_as(a)
    torch.testing.assert_close(a[outside], video.clamp((0 - 0.45) / 0.225, (1 - 0.45) / 0.225)[outside])
    torch.manual_seed(5)
    b1 = strong_augment(video)
    torch.manual_seed(5)
    assert torch.equal(b1, strong_augment(video))  # the torch RNG decides: a resumed run draws the same


TINY = ["data.batch_size=8", "data.num_workers=0", "data.num_frames=4", "data.fps=2.0", "data.size=32",
        "data.shuffle_buffer=8", "train.warmup_steps=1", "train.log_every=1", "train.save_every=0",
        "train.log_with=none", "model.overrides.video.num_frames=4", "model.overrides.video.image_size=32",
        "model.overrides.heads.hidden=64"]


def _config(name, shards, out, *extra):
    from mmvssl.config import load_config
    return load_config(data_path("configs", "methods", f"{name}.yaml"),
                       [f"data.shards={shards}", f"train.output_dir={out}", *TINY, *extra])


def test_tg_ships_the_rgb_stream_checkpoints_the_tg_stream_and_resumes_exactly(demo_shards, tmp_path, monkeypatch):
    """4 steps straight, and the same run stopped by SIGINT during step 2 and resumed: the same
    losses (the labelled subset, the strong views' draws, the TG stream's state)."""
    import signal

    from safetensors.torch import load_file

    import mmvssl
    from mmvssl.methods import pseudo_label
    from mmvssl.models.classifier import load_classifier
    from mmvssl.train.engine import pretrain
    from tests.conftest import read_jsonl
    straight, split = tmp_path / "straight", tmp_path / "split"
    # the unlabelled loss from step 2; at random initialisation the 5 classes' probabilities sit near 0.2,
    # so a threshold of 0.2 lets pseudo-labels in within 4 steps (the shipped 0.3 needs some training)
    short = ["train.max_steps=4", "method.options.unlabelled_warmup=1", "method.options.threshold=0.2"]
    final = pretrain(_config("tg", demo_shards["train"], straight, *short))
    calls, real = [], pseudo_label.strong_augment

    def signalling(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(pseudo_label, "strong_augment", signalling)
    stopped = pretrain(_config("tg", demo_shards["train"], split, *short))
    assert stopped.name == "step_00000002"
    monkeypatch.setattr(pseudo_label, "strong_augment", real)
    pretrain(_config("tg", demo_shards["train"], split, *short, "train.resume=latest"))
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(split / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in ("loss", "ce_labelled", "ce_pseudo", "align", "contrast", "pseudo_label_share"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x["step"], k)
    assert a[0]["ce_pseudo"] == 0  # step 1: the warm-up, no unlabelled loss
    assert all(0 <= r["pseudo_label_share"] <= 1 for r in a)  # logged at every step, into metrics.jsonl
    assert any(r["pseudo_label_share"] > 0 and r["ce_pseudo"] > 0 for r in a[1:])  # and they train
    state = load_file(str(straight / "checkpoints" / "step_00000004" / "method.safetensors"))
    assert any(k.startswith("tg_net.") for k in state) and any(k.startswith("rgb_head.") for k in state)
    assert int(state["steps_done"]) == 4
    model = mmvssl.load_model(final)  # the RGB stream alone, a complete model folder
    assert model.name == "video-tiny" and not any("tg_net" in k for k in model.state_dict())
    assert load_classifier(final).classes == ["circle", "square", "triangle", "cross", "ring"]


def test_cmpl_trains_both_networks_and_ships_the_main_one(demo_shards, tmp_path):
    from safetensors.torch import load_file

    from mmvssl.models.classifier import load_classifier
    from mmvssl.train.engine import pretrain
    out = tmp_path / "run"
    final = pretrain(_config("cmpl", demo_shards["train"], out, "train.max_steps=2", "train.save_every=1",
                             "train.keep_last=2"))
    from tests.conftest import read_jsonl
    log = read_jsonl(out / "metrics.jsonl")
    assert all(0 <= r["pseudo_label_share"] <= 1 and 0 <= r["pseudo_label_share_aux"] <= 1 for r in log)
    one = load_file(str(out / "checkpoints" / "step_00000001" / "method.safetensors"))
    two = load_file(str(out / "checkpoints" / "step_00000002" / "method.safetensors"))
    aux = [k for k in one if k.startswith("aux_net.stages.")]  # the auxiliary CNN's blocks
    assert aux and any(not torch.equal(one[k], two[k]) for k in aux)  # the auxiliary network trains
    assert one["aux_net.head.weight"].shape == (5, 64)  # the lighter width
    main = load_classifier(final)
    assert main.encoder.width == 128 and main.head.weight.shape == (5, 128)
    cfg = json.loads((Path(final) / "config.json").read_text())
    assert cfg["video"]["depth"] == 2  # the main network, not the auxiliary one
