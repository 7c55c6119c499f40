"""LaViLa's CLIPLoss and SSLCLIPLoss (facebookresearch/LaViLa lavila/models/loss.py): mmvssl's
nce_loss (CLIPLoss), ssl_clip_loss and ssl_clip_accuracy on the stored embeddings, indicators and
scales. The case stores LaViLa's logit scales (1 / temperature, and their logs); mmvssl's losses
take temperatures, so the scales enter as 1 / scale and autograd reaches them through it."""

from __future__ import annotations

import torch

from mmvssl.losses.contrastive import nce_loss, ssl_clip_accuracy, ssl_clip_loss, ssl_clip_scales
from tests.parity.margins import assert_margin, dot_error

INPUTS = ("image_embed", "text_embed", "gt_indicators", "logit_scale", "logit_scale_param", "logit_scale_pseudo_param")
OUTPUTS = ("sslclip_loss", "sslclip_grad_image_embed", "sslclip_grad_text_embed", "sslclip_grad_logit_scale",
           "sslclip_grad_logit_scale_param", "sslclip_grad_logit_scale_pseudo_param", "sslclip_acc",
           "sslclip_acc_gt", "sslclip_acc_pseudo", "clip_loss", "clip_grad_image_embed", "clip_grad_text_embed",
           "clip_grad_logit_scale", "clip_acc")
TOLERANCES = {}


def _leaves(t: dict) -> dict:
    return {k: t[k].clone().requires_grad_() for k in
            ("image_embed", "text_embed", "logit_scale", "logit_scale_param", "logit_scale_pseudo_param")}


def assert_argmax_is_clear(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, what: str) -> None:
    """The accuracies count rows whose argmax is their own text: a float decision, compared to the
    official percentages as if exact. The own logit must be clear of the row's best other logit by
    more than two logits' float error: each is a dot product of unit vectors of dim D (within
    margins.dot_error(D) of another kernel's) times its scale, plus the product's rounding (D + 1)."""
    logits = image @ text.T * scale  # (B, B), as ssl_clip_accuracy computes them
    own = logits.diagonal()
    best_other = logits.masked_fill(torch.eye(len(logits), dtype=torch.bool), float("-inf")).amax(dim=1)
    assert_margin((own - best_other).abs(), 2 * dot_error(image.shape[1] + 1, float(scale.max())), what)


def compute(t: dict, meta: dict) -> dict:
    assert meta["world_size"] == "1" and meta["use_vissl"] == "False", meta
    gt = t["gt_indicators"] == 1
    pseudo_scale = t["logit_scale_pseudo_param"].exp()
    # smallest margin in the cases 0.15 against a bound of 8.1e-5 (D = 16, scale 20)
    assert_argmax_is_clear(t["image_embed"], t["text_embed"], ssl_clip_scales(gt, gt, 1 / t["logit_scale"],
                           1 / pseudo_scale), "lavila sslclip_acc: own text against the best other")
    assert_argmax_is_clear(t["image_embed"], t["text_embed"], t["logit_scale"], "lavila clip_acc")
    out = {}
    # SSLCLIPLoss: once through the exp-space scale (its gradient), once through the log-space parameters
    x = _leaves(t)
    pseudo_tau = 1 / x["logit_scale_pseudo_param"].detach().exp()
    loss = ssl_clip_loss(x["image_embed"], x["text_embed"], 1 / x["logit_scale"], pseudo_temperature=pseudo_tau,
                         ground_truth=gt)
    loss.backward()
    out.update(sslclip_loss=loss.detach(), sslclip_grad_image_embed=x["image_embed"].grad,
               sslclip_grad_text_embed=x["text_embed"].grad, sslclip_grad_logit_scale=x["logit_scale"].grad)
    x = _leaves(t)
    ssl_clip_loss(x["image_embed"], x["text_embed"], 1 / x["logit_scale_param"].exp(),
                  pseudo_temperature=1 / x["logit_scale_pseudo_param"].exp(), ground_truth=gt).backward()
    out.update(sslclip_grad_logit_scale_param=x["logit_scale_param"].grad,
               sslclip_grad_logit_scale_pseudo_param=x["logit_scale_pseudo_param"].grad)
    acc = ssl_clip_accuracy(t["image_embed"], t["text_embed"], 1 / t["logit_scale"], pseudo_tau, gt)
    out.update(sslclip_acc=acc["acc"], sslclip_acc_gt=acc["acc_gt"], sslclip_acc_pseudo=acc["acc_pseudo"])
    # CLIPLoss: mmvssl's nce_loss
    x = _leaves(t)
    loss = nce_loss(x["image_embed"], x["text_embed"], 1 / x["logit_scale"])
    loss.backward()
    out.update(clip_loss=loss.detach(), clip_grad_image_embed=x["image_embed"].grad,
               clip_grad_text_embed=x["text_embed"].grad, clip_grad_logit_scale=x["logit_scale"].grad,
               clip_acc=ssl_clip_accuracy(t["image_embed"], t["text_embed"], 1 / t["logit_scale"])["acc"])
    return out
