"""The frame times of a per-video cache, and their pairing with the frame times a clip sampler
chose: shared by cached teacher features (mmvssl/teacher/cache.py) and cached optical flow (flow.py).

A cache holds one entry per time 0, 1/F, 2/F, ... over the whole video (F: the cache's fps). Each
sampled frame time t (clamped to the video's duration, where the decoder holds the last frame)
takes the cached entry nearest in time: inside the video at most half a cached step, 1 / (2F),
away; at the tail up to one step. Farther than one step (plus TIME_SLACK) is an error: the cache
does not cover the window.
"""

from __future__ import annotations

import math

import torch

TIME_SLACK = 1e-3  # seconds allowed beyond one cached step (rounding of container timestamps)


def cached_times(duration: float, fps: float) -> torch.Tensor:
    """(N,) the fixed frame times of the cache: i / fps for every i with i / fps < duration (at least 0)."""
    n = max(1, math.ceil(duration * fps - 1e-6))
    return torch.arange(n, dtype=torch.float64).div(fps).float()


def nearest_indices(times: torch.Tensor, sampled: torch.Tensor, duration: float, fps: float,
                    what: str = "teacher frame") -> torch.Tensor:
    """(T,) index of the cached time nearest to each sampled time (clamped to the duration);
    raises ValueError when one is farther than a cached step from every cached time."""
    wanted = sampled.double().clamp(max=max(duration, 0.0))  # past the end the decoder holds the last frame
    distance = (wanted[:, None] - times.double()[None, :]).abs()  # (T, N)
    best, index = distance.min(dim=1)
    worst = float(best.max())
    if worst > 1.0 / fps + TIME_SLACK:
        t = float(wanted[int(best.argmax())])
        raise ValueError(f"no cached {what} within {1.0 / fps:.3f} s of the sampled time {t:.3f} s "
                         f"(cached {float(times[0]):.3f}..{float(times[-1]):.3f} s)")
    return index
