"""Motion cues computed from decoded frames, on whatever device the frames are on.

The temporal gradient (TG, Xiong et al. 2021; FAME's foreground cue, Ding et al. 2022) is the
difference of consecutive frames. It is computed on the fly from frames the loader already
decoded, so it needs no storage (optical flow, which is costly, is cached in shards instead).

The papers take it between *consecutive decoded frames* of the source video (video-semisup's
`DecordDecode_Custom` and rawframe TG: frame idx and frame idx + 1 for every sampled idx), not
between two sampled frames 1/fps apart. The loader therefore decodes, on request
(`SampleSpec.next_frames`, set by the methods that read `tgrad`), the source frame right after
each sampled frame, cropped, flipped and colour-augmented with it: `video_next`, the same shape as
`video`. `temporal_gradient(video, video_next)` is then the difference of consecutive frames at
every sampled time.
"""

from __future__ import annotations

import torch


def temporal_gradient(video: torch.Tensor, next_frames: torch.Tensor | None = None) -> torch.Tensor:
    """Frame differences of video (..., C, T, H, W).

    With `next_frames` (the source frame right after each frame of `video`, same shape; the
    loader's `video_next`): out[..., t] = next_frames[..., t] - video[..., t], the difference of
    consecutive decoded frames at every sampled time. Without it (a batch that did not come through
    the loader with next frames): the difference of the sampled frames themselves, out[..., t] =
    video[..., t + 1] - video[..., t] for t < T - 1 and 0 for the last frame.

    The frame count (and an encoder's positional grid) is unchanged. A static clip gives zeros;
    differences of normalised frames are differences of pixels / std."""
    if video.ndim < 4:
        raise ValueError(f"temporal_gradient expects (..., C, T, H, W), got {tuple(video.shape)}")
    if next_frames is not None:
        if next_frames.shape != video.shape:
            raise ValueError(f"temporal_gradient: next frames {tuple(next_frames.shape)} do not match the video "
                             f"{tuple(video.shape)}")
        return next_frames - video
    grad = torch.zeros_like(video)
    grad[..., :-1, :, :] = video[..., 1:, :, :] - video[..., :-1, :, :]
    return grad
