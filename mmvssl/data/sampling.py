"""Temporal sampling: which window of a video a sample uses, and which texts go with it."""

from __future__ import annotations

import random


def random_window(duration: float, window: float, rng: random.Random) -> float:
    """Start of a window of `window` seconds drawn uniformly inside [0, duration]."""
    return rng.uniform(0.0, max(0.0, duration - window))


def center_window(duration: float, window: float) -> float:
    """Start of the window centred in the video (evaluation)."""
    return max(0.0, (duration - window) / 2.0)


def uniform_windows(duration: float, window: float, num_clips: int) -> list[float]:
    """Starts of `num_clips` windows spread evenly over the video (multi-clip evaluation)."""
    last = max(0.0, duration - window)
    if num_clips == 1:
        return [last / 2.0]
    return [last * i / (num_clips - 1) for i in range(num_clips)]


def _gap(item: dict, start: float, end: float) -> float:
    """Seconds between a narration and the window; 0 when they overlap."""
    return max(0.0, float(item["start"]) - end, start - float(item["end"]))


def select_texts(meta: dict, start: float, end: float, k: int) -> list[str]:
    """Up to k texts for the window [start, end): the caption (it describes the whole video),
    then the narrations nearest in time, overlapping ones first (MIL-NCE candidates)."""
    texts = []
    caption = meta.get("caption")
    if isinstance(caption, str) and caption.strip():
        texts.append(caption.strip())
    narrations = [n for n in meta.get("narrations") or []
                  if isinstance(n, dict) and str(n.get("text", "")).strip() and "start" in n and "end" in n]
    narrations.sort(key=lambda n: (_gap(n, start, end), float(n["start"])))
    texts.extend(str(n["text"]).strip() for n in narrations)
    return texts[:k]
