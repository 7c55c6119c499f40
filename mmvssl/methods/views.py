"""Where each view of a multi-view batch lies in time, for the methods whose targets depend on it
(teg, carl, cstp): the views' windows from the loader's metadata, the time of each temporal token
of the video transformer, and the temporal IoU of two windows.

The loader records every view's [start, end] seconds in batch["meta"][i]["views"] (samplers with
more than one view). Frame f of a view of T frames is the source frame shown at
start + f * (end - start) / T (mmvssl.data.decode.decode_window); the transformer's temporal token
k merges frames k * p ... k * p + p - 1 (p = T / t), and its time is the mean of theirs.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def view_windows(batch: dict, device: torch.device | str | None = None) -> torch.Tensor:
    """(B, V, 2) [start, end] seconds of every view of every clip, from batch["meta"][i]["views"]."""
    meta = batch.get("meta")
    if not meta or any(not isinstance(m, dict) or "views" not in m for m in meta):
        raise ConfigError("this method reads each view's window from batch['meta'][i]['views'], which the loader "
                          "writes only for multi-view samplers (data.sampler: same, cvrl, teg, svt)")
    return torch.tensor([m["views"] for m in meta], dtype=torch.float32, device=device)


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
