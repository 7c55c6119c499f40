"""CVRL as tensorflow/models official/projects/video_ssl trains it: NT-Xent with its two directions
summed (losses/losses.py `loss = loss_a + loss_b`) by hand, the 4-layer projection head
(configs/video_ssl.py hidden_layer_num 3 + Dense(projection_dim)), and the asymmetric blur /
solarisation of dataloaders/video_ssl_input.py `_process_image` as configs/methods/cvrl.yaml sets them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmvssl.config import load_config
from mmvssl.errors import ConfigError
from mmvssl.resources import data_path


def test_nt_xent_sum_of_directions_by_hand():
    """B = 2, temperature 0.5. a_1 = (1, 0), a_2 = (0, 1), b_1 = (0.6, 0.8), b_2 = (0.8, 0.6).
    loss_a, anchor a_i: logits over [b_1, b_2, a_j (j != i)] / t, positive b_i (losses.py concatenates
    logits_ab and logits_aa with the anchor itself masked out); loss_b likewise with a and b swapped."""
    from mmvssl.losses.contrastive import nt_xent_loss
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.6, 0.8], [0.8, 0.6]], dtype=torch.float64)
    t = 0.5

    def ce(positive, others):
        return -(positive / t) + math.log(math.exp(positive / t) + sum(math.exp(o / t) for o in others))
    # a_1: with b_1 0.6 (positive), b_2 0.8, a_2 0.0; a_2: b_2 0.6 (positive), b_1 0.8, a_1 0.0
    loss_a = (ce(0.6, [0.8, 0.0]) + ce(0.6, [0.8, 0.0])) / 2
    # b_1: with a_1 0.6 (positive), a_2 0.8, b_2 0.96; b_2: a_2 0.6 (positive), a_1 0.8, b_1 0.96
    loss_b = (ce(0.6, [0.8, 0.96]) + ce(0.6, [0.8, 0.96])) / 2
    assert nt_xent_loss(a, b, t, reduction="sum").item() == pytest.approx(loss_a + loss_b, rel=1e-12)
    assert nt_xent_loss(a, b, t).item() == pytest.approx((loss_a + loss_b) / 2, rel=1e-12)  # the default mean
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        nt_xent_loss(a, b, t, reduction="max")


def test_cvrl_config_sums_the_directions_with_a_four_layer_head():
    from mmvssl.methods import get_method
    from mmvssl.methods.contrastive import build_student
    cfg = load_config(data_path("configs", "methods", "cvrl.yaml"))
    method_cls = get_method(cfg.method.name)
    options = method_cls.options(cfg)
    assert options.reduction == "sum" and options.temperature == 0.1
    head = build_student(cfg).heads.mlp["video"]
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 3 + [nn.Linear]  # three hidden layers, then the output
    assert head[-1].out_features == 128
    # the method's loss is the sum form: twice the mean on the same embeddings
    g = torch.Generator().manual_seed(0)
    views = torch.nn.functional.normalize(torch.randn(6, 2, 16, generator=g), dim=-1)
    summed, _ = method_cls(options)({"video_ssl": views}, {})
    options.reduction = "mean"
    mean, _ = method_cls(options)({"video_ssl": views}, {})
    assert summed.item() == pytest.approx(2 * mean.item(), rel=1e-6)
    options.reduction = "both"
    with pytest.raises(ConfigError, match="method.options.reduction must be 'mean' or 'sum'"):
        method_cls(options)


def test_cvrl_config_blurs_and_solarises_each_clip_as_cvrl():
    from mmvssl.data.augment import Augmenter
    from mmvssl.data.options import augment_options
    cfg = load_config(data_path("configs", "methods", "cvrl.yaml"))
    options = augment_options(cfg.data.augment)
    assert options.blur_per_view == (1.0, 0.1) and options.solarize_per_view == (0.0, 0.2)
    first, second = Augmenter(options, 64).view_transforms
    assert first.transforms[4].p == 1.0 and len(first.transforms) == 5  # blur always, never solarised
    assert second.transforms[4].p == 0.1 and second.transforms[5].p == 0.2  # blur 0.1, then solarise 0.2
    cfg.data.augment.solarize_per_view = [0.0, 1.5]
    with pytest.raises(ConfigError, match=r"data.augment.solarize_per_view: every entry must lie in \[0, 1\]"):
        augment_options(cfg.data.augment)
