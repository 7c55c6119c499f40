"""FixMatch's parts (Sohn et al. 2020), shared by the semi-supervised methods tg and cmpl: a strong
augmentation of clips on the device, confident pseudo-labels from weak views, and the masked
cross-entropy that lets only confident pseudo-labels supervise the strong views.

The loader gives the weak view (random resized crop and flip, `data.augment`); the strong view is
made here from it, on the device, with the same random parameters for every frame of a clip
(temporally consistent): colour jitter (brightness, contrast, saturation), greyscale, and one
cutout box, FixMatch's RandAugment + Cutout reduced to the operations that keep a clip's motion.
Written by hand because torchvision's v2 transforms draw one set of parameters per call, i.e. one
per batch, where FixMatch draws one per clip; these draws use the torch RNG, which the engine
checkpoints, so a resumed run draws the same.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..data.loader import VIDEO_MEAN, VIDEO_STD
from ..errors import ConfigError
from .supervised import build_classifier, setup_labels, targets_of, task_of


def strong_augment(video: torch.Tensor, jitter: float = 0.4, grayscale: float = 0.2, cutout: float = 0.5
                   ) -> torch.Tensor:
    """Normalised clips (B, C, T, H, W) -> strongly augmented clips of the same shape: brightness,
    contrast and saturation factors uniform in [1 - jitter, 1 + jitter], greyscale with probability
    `grayscale`, and a cutout square of side `cutout` x the frame's short side (filled with grey)."""
    B, C, T, H, W = video.shape
    dev = video.device
    mean, std = VIDEO_MEAN.to(dev), VIDEO_STD.to(dev)
    x = (video * std + mean).clamp(0, 1)  # pixels in [0, 1]

    def factor():
        return (1 + (torch.rand(B, 1, 1, 1, 1) * 2 - 1) * jitter).to(dev)
    x = x * factor()  # brightness
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]  # (B, 1, T, H, W)
    x = (x - grey.mean(dim=(2, 3, 4), keepdim=True)) * factor() + grey.mean(dim=(2, 3, 4), keepdim=True)  # contrast
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    x = (x - grey) * factor() + grey  # saturation
    to_grey = (torch.rand(B) < grayscale).to(dev)[:, None, None, None, None]
    x = torch.where(to_grey, grey.expand_as(x), x).clamp(0, 1)
    if cutout > 0:
        side = max(1, int(round(cutout * min(H, W))))
        cy, cx = torch.randint(H, (B,)), torch.randint(W, (B,))
        ys, xs = torch.arange(H)[None], torch.arange(W)[None]
        inside_y = ((ys >= (cy - side // 2)[:, None]) & (ys < (cy - side // 2 + side)[:, None])).to(dev)  # (B, H)
        inside_x = ((xs >= (cx - side // 2)[:, None]) & (xs < (cx - side // 2 + side)[:, None])).to(dev)  # (B, W)
        box = (inside_y[:, :, None] & inside_x[:, None, :])[:, None, None]  # (B, 1, 1, H, W)
        x = torch.where(box, torch.full_like(x, 0.5), x)
    return (x - mean) / std


def confident_pseudo_labels(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) class probabilities -> (argmax labels (N,), mask (N,) bool: max probability >= threshold)."""
    confidence, labels = probs.max(dim=-1)
    return labels, confidence >= threshold


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FixMatch's unlabelled loss: sum over rows of mask * CE(logits, labels), divided by the number of
    rows (every unlabelled sample, confident or not); a row below the threshold contributes nothing,
    not even gradient. 0 for no rows."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # (N,)
    return torch.where(mask, ce, torch.zeros_like(ce)).sum() / logits.shape[0]


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over the rows whose label is not -1; 0 (with a graph) when there are none."""
    known = labels >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known].float(), labels[known])


def weak_and_strong(method, batch: dict) -> dict:
    """The batch with video (B, 2, C, T, H, W): the loader's (weak) view and its strong augmentation,
    and `labels` (B,), -1 where unlabelled."""
    video = batch["video"]
    if video.ndim != 5:
        raise ConfigError(f"method '{method.name}' makes its own strong view from one clip per sample: "
                          f"use data.sampler random (got video {tuple(video.shape)})")
    o = method.opt
    strong = strong_augment(video, o.jitter, o.grayscale, o.cutout)
    return {**batch, "video": torch.stack([video, strong], dim=1), "labels": targets_of(method, batch)}


def check_semi_options(options, name: str) -> None:
    if not 0 < options.threshold <= 1:
        raise ConfigError(f"method.options.threshold must be in (0, 1], got {options.threshold} (method '{name}')")


def build_semi(cls, cfg: DictConfig, ctx, second_config: Callable | None = None,
               second_network: Callable | None = None) -> tuple:
    """(main classifier, method) for a semi-supervised method with a second network (TG's temporal-
    gradient stream, CMPL's auxiliary model): its options checked, one clip per sample, both
    classifiers for the task (the main one from options.pretrained; the second one
    second_network(options, task), or the classifier of the config second_config(options), randomly
    initialised), and the labelled subset set up."""
    options = cls.options(cfg)
    check_semi_options(options, cls.name)
    if ctx.spec.multi_view:
        raise ConfigError(f"method '{cls.name}' makes its own strong view from one clip per sample: "
                          f"data.sampler '{ctx.spec.sampler}' gives several (use random)")
    task = task_of(options, cls.name)
    net = build_classifier(cfg, options, task, pretrained=options.pretrained)
    second = (second_network(options, task) if second_network is not None
              else build_classifier(second_config(options), options, task))
    method = cls(options, second)
    setup_labels(method, cfg, ctx, options, task)
    return net, method
