"""Distillation from a frozen image teacher: pure loss functions and the student's predictor.

Per-frame distillation (iBoot-style): the student's temporal tokens (B, t, D_s), through a
predictor MLP, regress the teacher's per-frame embeddings (B, T, D_t). The teacher's T frames
map onto the student's t temporal positions by averaging the frames each tubelet covers
(adaptive average pooling over time, exact when t divides T). Clip-level distillation: the
student's clip embedding (B, D_s), through its predictor, matches the mean teacher embedding.

Distances (BYOL style, the teacher side never gets a gradient):
- `cosine`: 1 - cos(prediction, target), 0 when aligned (the gradient of negative cosine);
- `smooth_l1`: smooth L1 between the prediction and the target standardised per vector
  (layer norm without affine parameters, as MaskFeat / MVD normalise their regression targets).

Samples without video (mask False) are left out of the mean.

Reference: iBoot (Saxena et al. 2022) has no official code public that we could find (the code index
searched by the paper's title and by "iboot" repository names), so these follow its text: a video
student regressing a frozen image model's per-frame and clip features through predictors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DISTANCES = ("cosine", "smooth_l1")


def align_frames(teacher: torch.Tensor, positions: int) -> torch.Tensor:
    """(B, T, D) per-frame teacher embeddings -> (B, positions, D), each position the mean of the
    frames it covers."""
    if teacher.shape[1] == positions:
        return teacher
    return F.adaptive_avg_pool1d(teacher.transpose(1, 2), positions).transpose(1, 2)


def _distance(prediction: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
    """(..., D) x (..., D) -> (...) per-vector distance; the target is detached."""
    target = target.detach()
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(prediction, target, dim=-1)
    if distance == "smooth_l1":
        target = F.layer_norm(target, target.shape[-1:])
        return F.smooth_l1_loss(prediction, target, reduction="none").mean(dim=-1)
    raise ValueError(f"unknown distillation distance '{distance}' (expected: {', '.join(DISTANCES)})")


def _masked_mean(per_sample: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) -> scalar mean over the samples where mask is True (0 with a gradient when none are)."""
    if mask is None:
        return per_sample.mean()
    mask = mask.to(per_sample.device, torch.bool)
    return (per_sample * mask).sum() / mask.sum().clamp(min=1)


def distill_frames(prediction: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                   distance: str = "cosine") -> torch.Tensor:
    """prediction (B, t, D) per temporal position, teacher (B, T, D) per frame -> scalar loss."""
    if prediction.ndim != 3 or teacher.ndim != 3 or prediction.shape[0] != teacher.shape[0]:
        raise ValueError(f"distill_frames expects (B, t, D) predictions and (B, T, D) teacher frames, "
                         f"got {tuple(prediction.shape)} and {tuple(teacher.shape)}")
    target = align_frames(teacher.float(), prediction.shape[1])  # (B, t, D)
    return _masked_mean(_distance(prediction, target, distance).mean(dim=1), mask)


def distill_clip(prediction: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                 distance: str = "cosine") -> torch.Tensor:
    """prediction (B, D) per clip, teacher (B, T, D) per frame (or (B, D)) -> scalar loss against the
    mean teacher embedding."""
    target = teacher.float().mean(dim=1) if teacher.ndim == 3 else teacher.float()  # (B, D)
    if prediction.ndim != 2 or prediction.shape != target.shape:
        raise ValueError(f"distill_clip expects a (B, D) prediction and (B, T, D) teacher frames, "
                         f"got {tuple(prediction.shape)} and {tuple(teacher.shape)}")
    return _masked_mean(_distance(prediction, target, distance), mask)


DISTILL_LOSSES = {"distill_frames": distill_frames, "distill_clip": distill_clip}


class Predictor(nn.Module):
    """BYOL's predictor: Linear -> LayerNorm -> GELU -> Linear, on the last dimension. Owned by the
    objective, so it trains (and checkpoints) with it and never reaches the saved student."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or 2 * out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (..., in_dim) -> (..., out_dim)
