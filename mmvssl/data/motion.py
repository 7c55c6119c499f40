"""Motion cues computed from decoded frames, on whatever device the frames are on.

The temporal gradient (TG, Xiong et al. 2021; FAME's foreground cue, Ding et al. 2022) is the
difference of consecutive frames. It is computed on the fly from the clip the loader already
decoded, so it needs no storage (optical flow, which is costly, is cached in shards instead).
"""

from __future__ import annotations

import torch


def temporal_gradient(video: torch.Tensor) -> torch.Tensor:
    """Frame differences of video (..., C, T, H, W): out[..., t] = video[..., t + 1] - video[..., t]
    for t < T - 1 and 0 for the last frame, so the frame count (and an encoder's positional grid)
    is unchanged. A static clip gives zeros; the mean and scale of the input cancel except for
    the scale (differences of normalised frames are differences of pixels / std)."""
    if video.ndim < 4:
        raise ValueError(f"temporal_gradient expects (..., C, T, H, W), got {tuple(video.shape)}")
    grad = torch.zeros_like(video)
    grad[..., :-1, :, :] = video[..., 1:, :, :] - video[..., :-1, :, :]
    return grad
