"""Temporal sampling, in one place: which window of a video a sample uses (training samplers,
evaluation clips, the sliding windows of narrate and the search index), which times its frames
show, and which texts go with it."""

from __future__ import annotations

import random

import numpy as np


def frame_times(start: float, num_frames: int, fps: float) -> np.ndarray:
    """(num_frames,) seconds: frame i of a clip decoded at `fps` from `start` shows time start + i / fps
    (mmvssl.data.decode.decode_window; cached teacher features and flow pair with these times)."""
    return start + np.arange(num_frames) / fps


def sliding_windows(duration: float, window: float, stride: float) -> list[float]:
    """Starts of windows of `window` s every `stride` s that fit in the video (at least one, at 0),
    rounded to the millisecond (narrate's rows and the search index's windows are keyed by them)."""
    return np.arange(0.0, max(duration - window, 0.0) + 1e-6, stride).round(3).tolist()


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


TEXT_SOURCES = ("human", "paraphrase", "pseudo")


def _nearest(items: list, start: float, end: float) -> list[dict]:
    """Timed texts ({start, end, text}) sorted nearest the window first (overlapping ones first)."""
    items = [n for n in items or []
             if isinstance(n, dict) and str(n.get("text", "")).strip() and "start" in n and "end" in n]
    return sorted(items, key=lambda n: (_gap(n, start, end), float(n["start"])))


def pseudo_candidates(item: dict) -> list[str]:
    """The texts a pseudo-narration offers: its `candidates` (every narrator sample of the window,
    `mmvssl narrate`), or its `text` alone (shards without candidates). ValueError naming the key
    when `candidates` is not a list of {text}."""
    candidates = item.get("candidates")
    if candidates is None:
        return [str(item["text"]).strip()]
    if not isinstance(candidates, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                                   for c in candidates):
        raise ValueError("metadata key 'pseudo_narrations': an entry's 'candidates' is not a list of {text, score}")
    return [c["text"].strip() for c in candidates if c["text"].strip()] or [str(item["text"]).strip()]


def source_texts(meta: dict, source: str, start: float, end: float, k: int,
                 rng: random.Random | None = None) -> list[str]:
    """Up to k texts of one source: human (select_texts), paraphrase (for each narration nearest the
    window, one of its paraphrases, drawn with `rng`, else the first) or pseudo (for each
    pseudo-narrated window nearest the window, one of the narrator's candidates, drawn with `rng`,
    else the best: LaViLa draws one of a clip's narrations, facebookresearch/LaViLa
    lavila/data/datasets.py `get_raw_item`, narration_selection 'random')."""
    if source == "human":
        return select_texts(meta, start, end, k)
    if source == "pseudo":
        windows = _nearest(meta.get("pseudo_narrations"), start, end)[:k]
        return [rng.choice(options) if rng else options[0] for options in map(pseudo_candidates, windows)]
    if source == "paraphrase":
        by_narration: dict = {}
        for p in _nearest(meta.get("paraphrases"), start, end):
            by_narration.setdefault(p.get("of"), []).append(str(p["text"]).strip())
        return [rng.choice(options) if rng else options[0] for options in list(by_narration.values())[:k]]
    raise ValueError(f"unknown text source '{source}' ({', '.join(TEXT_SOURCES)})")


def select_source_texts(meta: dict, start: float, end: float, k: int, sources: tuple[str, ...] = ("human",),
                        rng: random.Random | None = None) -> tuple[list[str], bool]:
    """LaViLa's text for a clip: one of `sources` that this sample has, drawn with `rng`; returns
    (texts, generated) where generated says the texts are pseudo-narrations (narrator outputs);
    paraphrases of human narrations count as ground truth, as in LaViLa.
    With the single source "human" this is select_texts and draws nothing."""
    if tuple(sources) == ("human",):
        return select_texts(meta, start, end, k), False
    available = [s for s in sources if source_texts(meta, s, start, end, 1)]
    if not available:
        return [], False
    source = rng.choice(available) if rng is not None and len(available) > 1 else available[0]
    return source_texts(meta, source, start, end, k, rng), source == "pseudo"


def cvrl_gap(max_gap: float, rng: random.Random) -> float:
    """CVRL's temporal interval between two clips: density decreasing linearly from 0 to
    max_gap, p(t) = 2 (max_gap - t) / max_gap^2 (inverse CDF: t = max_gap (1 - sqrt(1 - u)))."""
    return max_gap * (1.0 - (1.0 - rng.random()) ** 0.5) if max_gap > 0 else 0.0


def cvrl_pair(duration: float, window: float, rng: random.Random) -> list[float]:
    """Starts of CVRL's two clips: their gap drawn by cvrl_gap, the pair placed uniformly."""
    room = max(0.0, duration - window)
    gap = cvrl_gap(room, rng)
    first = rng.uniform(0.0, room - gap)
    starts = [first, first + gap]
    rng.shuffle(starts)  # neither clip is always the earlier one
    return starts


# TeG: the short clip starts a multiple of this many frames after the long clip (both at one rate), so
# that with a temporal tubelet of 1, 2 or 4 frames every short-clip token covers exactly the frames of
# one long-clip token (methods/teg.py checks the model's tubelet)
TEG_GRID_FRAMES = 4
# SVT (kahnchana/svt, datasets/decoder.py `decode`, temporal_aug): the two global views are the clip
# less 5 of its frames at one end or the other (5 of 8 x 32 = 256 frames in its TimeSformer config),
# every local view spans an eighth of the clip (`local_width = max_len // 8`), placed at random in it
SVT_GLOBAL_SHIFT = 5 / 256
SVT_LOCAL_SHARE = 1 / 8
# CARL (minghchen/CARL_code, datasets/penn_action.py `sample_frames`, 'time_augment' with
# configs/scl_transformer_config.yml): the second view starts at most (1 - CONSISTENT_OFFSET) = 0.8 of
# the first view's length away from it
CARL_MAX_SHIFT = 0.8


def long_short_windows(duration: float, long_window: float, short_window: float,
                       rng: random.Random, fps: float = 0.0, grid: int = 1) -> list[float]:
    """TeG: a long clip, and a short clip drawn inside it. Returns [long start, short start]. With
    `fps`, the short clip starts a multiple of `grid` frames (at `fps`) after the long one."""
    long_start = random_window(duration, long_window, rng)
    inner = max(0.0, min(long_window, max(duration, short_window) - long_start) - short_window)
    if fps > 0:  # on the long clip's frame grid
        steps = int(round(inner * fps + 1e-6)) // grid
        return [long_start, long_start + rng.randint(0, steps) * grid / fps]
    return [long_start, long_start + rng.uniform(0.0, inner)]


def global_local_windows(duration: float, clip: float, num_global: int, num_local: int,
                         rng: random.Random) -> list[tuple[float, float]]:
    """SVT: one clip of `clip` seconds placed at random; `num_global` global views spanning it (less
    SVT_GLOBAL_SHIFT of it at the end for even views, at the start for odd ones), then `num_local`
    local views of SVT_LOCAL_SHARE of it, each at random inside it. Returns (start, length) per view."""
    start = random_window(duration, clip, rng)
    shift, local = clip * SVT_GLOBAL_SHIFT, clip * SVT_LOCAL_SHARE
    views = [(start + (shift if g % 2 else 0.0), clip - shift) for g in range(num_global)]
    return views + [(start + rng.uniform(0.0, clip - local), local) for _ in range(num_local)]


def carl_windows(duration: float, window: float, max_scale: float, rng: random.Random) -> list[tuple[float, float]]:
    """CARL: two temporal crops of one video, each `window` x U[1, max_scale] long (CARL's
    SAMPLING_REGION), the second starting within CARL_MAX_SHIFT of the first's length of the first's
    start; both stay inside the video. Each is decoded as the same number of frames, so the two
    differ in length and frame rate. Returns (start, length) per view."""
    lengths = [window * rng.uniform(1.0, max(1.0, max_scale)) for _ in range(2)]
    first = random_window(duration, lengths[0], rng)
    shift = CARL_MAX_SHIFT * lengths[0]
    low, high = max(0.0, first - shift), max(0.0, min(first + shift, duration - lengths[1]))
    second = rng.uniform(low, max(low, high))
    return [(first, lengths[0]), (second, lengths[1])]


# CSTP (KT27-A/CSTP @ cd68686, data_process/datasets.py: PACE, OVERLAP_TEM_RATE; data_process/preprocess_data.py:
# OVERLAP_SPA_RATE): the share of a clip the other clip covers, in time and in space alike, one class each
CSTP_OVERLAP_SHARES = (1.0, 0.8, 0.6, 0.4, 0.2)
CSTP_MAX_TRIES = 100  # upstream draws again until the second clip lies in the video (a share of 1 always does)


def cstp_rates(max_rate: float) -> list[int]:
    """CSTP's playback rates (frame strides): the powers of two up to `max_rate` (data.long_scale);
    upstream's PACE 1, 2, 4, 8 at 8."""
    rates = [1]
    while rates[-1] * 2 <= max_rate + 1e-9:
        rates.append(rates[-1] * 2)
    return rates


def overlapping_pair(duration: float, window: float, rng: random.Random,
                     max_rate: float = 1.0) -> list[tuple[float, float]]:
    """CSTP's two clips, drawn as KT27-A/CSTP data_process/datasets.py UcfRepreBYOLSpPre.repre_train_clip
    draws them: one playback rate r for both, uniform among cstp_rates(max_rate) whose span r x `window`
    fits the video (upstream: pb_label up to log2(frames / (T - 1))); the first clip's start uniform; a
    class k uniform in 0..4 and a side, the second clip shifted (1 - CSTP_OVERLAP_SHARES[k]) of the span
    before or after the first, both drawn again until it lies in the video. A video shorter than the
    span gives two equal clips from 0 (upstream: class 0). Returns (start, length) per clip: each is
    decoded as data.num_frames frames, so r is the playback rate (mmvssl.methods.cstp reads r and k back
    from the windows)."""
    rates = cstp_rates(max_rate)
    span = rng.choice([r for r in rates if r * window <= duration + 1e-9] or rates[:1]) * window
    room = max(0.0, duration - span)
    first = rng.uniform(0.0, room)
    second = first
    for _ in range(CSTP_MAX_TRIES if room > 0 else 0):
        shift = (1.0 - rng.choice(CSTP_OVERLAP_SHARES)) * span * rng.choice((-1.0, 1.0))
        if 0.0 <= first + shift <= room:
            second = first + shift
            break
    return [(first, span), (second, span)]


def curriculum_pair(duration: float, window: float, span_share: float, rng: random.Random) -> list[float]:
    """ConCur: two clips of `window`, the second starting d seconds after the first, d uniform in
    [0, span_share x (duration - window)]: the curriculum's share of what the video allows."""
    room = max(0.0, duration - window)
    distance = rng.uniform(0.0, min(1.0, max(0.0, span_share)) * room)
    first = rng.uniform(0.0, room - distance)
    return [first, first + distance]


SAMPLERS = ("random", "center", "uniform", "same", "cvrl", "teg", "svt", "carl", "overlap", "concur")


def view_windows(sampler: str, duration: float, window: float, rng: random.Random, train: bool,
                 long_scale: float = 2.0, num_clips: int = 1, num_global: int = 2,
                 num_local: int = 2, fps: float = 0.0, span_share: float = 1.0) -> list[tuple[float, float]]:
    """(start, length) of every view a sampler asks for; the first view's audio is kept.

    random/center: one clip; uniform: `num_clips` evenly spread; same: `num_clips` copies of one
    window; cvrl: two clips at CVRL's gap; overlap: two clips of CSTP's overlap classes at one playback
    rate up to long_scale (CSTP); concur: two clips
    `span_share` of the video apart at most (ConCur); carl: two crops of different length (CARL);
    teg: [short, long] (long = long_scale x window, the short inside it on its frame grid at `fps`);
    svt: globals then locals of one clip of long_scale x window."""
    long_window = window * long_scale
    if sampler in ("random", "center"):
        start = random_window(duration, window, rng) if train and sampler == "random" else center_window(duration, window)
        return [(start, window)]
    if sampler == "uniform":
        return [(s, window) for s in uniform_windows(duration, window, num_clips)]
    if sampler == "same":  # SimCLR on video: `num_clips` views of one window (decoded once, augmented apart)
        start = random_window(duration, window, rng) if train else center_window(duration, window)
        return [(start, window)] * num_clips
    if sampler == "cvrl":
        return [(s, window) for s in cvrl_pair(duration, window, rng)]
    if sampler == "overlap":
        return overlapping_pair(duration, window, rng, long_scale)
    if sampler == "concur":
        return [(s, window) for s in curriculum_pair(duration, window, span_share, rng)]
    if sampler == "carl":
        return carl_windows(duration, window, long_scale, rng)
    if sampler == "teg":
        long_start, short_start = long_short_windows(duration, long_window, window, rng, fps, TEG_GRID_FRAMES)
        return [(short_start, window), (long_start, long_window)]
    if sampler == "svt":
        return global_local_windows(duration, long_window, num_global, num_local, rng)
    raise ValueError(f"unknown sampler '{sampler}' ({', '.join(SAMPLERS)})")
