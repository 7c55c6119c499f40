"""Where each view of a multi-view batch lies in time and space, for the methods whose targets depend
on it (teg, carl, cstp, constcl): the views' windows and crops the loader records, the time of each temporal token
of the video transformer, and the temporal IoU of two windows and the IoU of two crops.

The loader records every view's [start, end] seconds in batch["view_times"] (B, V, 2) (samplers with
more than one view; `video`'s views first, then each named group's: mmvssl.modalities). Frame f of a view of T frames is the source frame shown at
start + f * (end - start) / T (mmvssl.data.decode.decode_window); the transformer's temporal token
k merges frames k * p ... k * p + p - 1 (p = T / t), and its time is the mean of theirs.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def view_windows(batch: dict, device: torch.device | str | None = None) -> torch.Tensor:
    """(B, V, 2) [start, end] seconds of every view of every clip: batch["view_times"]."""
    if "view_times" not in batch:
        raise ConfigError("this method reads each view's window from batch['view_times'], which the loader "
                          "writes only for multi-view samplers (data.sampler: same, cvrl, teg, svt)")
    return batch["view_times"].to(device=device, dtype=torch.float32)


def token_times(windows: torch.Tensor, num_frames: int, tokens: int) -> torch.Tensor:
    """windows (..., 2) seconds, each decoded as `num_frames` frames and embedded as `tokens`
    temporal positions -> (..., tokens): the mean time of the frames each token merges."""
    if tokens < 1 or num_frames % tokens:
        raise ValueError(f"{num_frames} frames do not split into {tokens} temporal tokens")
    start, end = windows[..., :1], windows[..., 1:]
    frames = torch.arange(num_frames, device=windows.device, dtype=windows.dtype) / num_frames
    times = start + (end - start) * frames  # (..., T)
    return times.unflatten(-1, (tokens, num_frames // tokens)).mean(-1)  # (..., t)


def temporal_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of windows a, b (..., 2) seconds -> (...); 0 when they do not meet."""
    inter = (torch.minimum(a[..., 1], b[..., 1]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    union = (a[..., 1] - a[..., 0]) + (b[..., 1] - b[..., 0]) - inter
    return inter / union.clamp(min=1e-9)


def view_crops(batch: dict, device=None) -> torch.Tensor:
    """(B, V, 4) each view's crop [x0, y0, x1, y1]: batch["view_crops"] (the loader's); full frames
    [0, 0, 1, 1] for a batch without it."""
    if "view_crops" in batch:
        return batch["view_crops"].to(device=device, dtype=torch.float32)
    B, V = batch["video"].shape[:2]
    return torch.tensor([0.0, 0.0, 1.0, 1.0], device=device).expand(B, V, 4)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of boxes a, b (..., 4) [x0, y0, x1, y1] -> (...)."""
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return w * h / (area_a + area_b - w * h).clamp(min=1e-9)
