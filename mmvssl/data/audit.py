"""Look at built shards: `shards inspect` (counts, hours, distributions, a contact sheet PNG)
and `shards verify` (decode every sample, list the failures). Works on mmvssl shards,
video2dataset shards (failed downloads have a `.json` but no video) and plain webdataset shards.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import webdataset as wds

from .decode import DecodeError, decode_all, decode_window, probe
from .rawsample import REFUSED, metadata, video_member
from .shardio import MemberLimits, list_shards, skip_unreadable_shard, tar_stage


def iter_raw(shards: str, limits: MemberLimits | None = None):
    """Raw samples (member bytes, nothing decoded or unpickled) of every shard, in order; members
    over `limits` are refused unread (the sample carries rawsample.REFUSED)."""
    return wds.DataPipeline(wds.SimpleShardList(list_shards(shards)), tar_stage(skip_unreadable_shard, limits))


def _meta(raw: dict, problems: list | None = None) -> dict:
    """The metadata with the caption, {} when they are unusable (not a JSON object, a bad type or
    number: rawsample.metadata_problem); the key and reason go to `problems`, never fatal."""
    try:
        return metadata(raw, with_caption=True)
    except DecodeError as e:
        if problems is not None:
            problems.append({"shard": raw.get("__url__"), "key": raw.get("__key__"), "reason": str(e)})
        return {}


def _video(raw: dict) -> bytes | None:
    ext = video_member(raw)
    return raw[ext] if ext else None


def inspect_shards(shards: str, limits: MemberLimits | None = None) -> dict:
    """Counts, total hours, duration and resolution distributions, modality coverage; samples
    with unusable metadata or a member over `limits` are counted (`bad_metadata`, `refused`) and
    listed with their key and reason (`problems`, the first 20)."""
    durations, resolutions, codecs = [], Counter(), Counter()
    stats = Counter()
    problems: list[dict] = []
    for raw in iter_raw(shards, limits):
        stats["samples"] += 1
        if REFUSED in raw:
            stats["refused"] += 1
            _meta(raw, problems)
            continue
        before = len(problems)
        meta, data = _meta(raw, problems), _video(raw)
        if len(problems) > before:  # the loader skips it: counted here, never in the hours
            stats["bad_metadata"] += 1
            continue
        if data is None:
            stats["without_video"] += 1
            continue
        stats["with_video"] += 1
        if any(meta.get(k) is None for k in ("duration", "width", "height")):
            try:
                meta.update(probe(data, check_decode=False).to_dict())
            except DecodeError:
                stats["unreadable"] += 1
                continue
        durations.append(float(meta["duration"]))
        resolutions[f"{meta['width']}x{meta['height']}"] += 1
        codecs[str(meta.get("video_codec", "?"))] += 1
        stats["with_audio"] += bool(meta.get("has_audio"))
        stats["with_caption"] += bool(str(meta.get("caption") or "").strip())
        stats["with_narrations"] += bool(meta.get("narrations"))
        stats["narrations"] += len(meta.get("narrations") or [])
    d = np.asarray(durations) if durations else np.zeros(1)
    return {
        **{k: int(v) for k, v in stats.items()},
        "hours": float(d.sum() / 3600.0) if durations else 0.0,
        "duration_s": {"min": float(d.min()), "p10": float(np.percentile(d, 10)), "median": float(np.median(d)),
                       "p90": float(np.percentile(d, 90)), "max": float(d.max())},
        "resolutions": dict(resolutions.most_common(10)),
        "video_codecs": dict(codecs.most_common()),
        **({"problems": problems[:20]} if problems else {}),
    }


def _flow_images(raw: dict, times: np.ndarray) -> list[np.ndarray] | None:
    """The cached flow nearest each time, colour-wheel coded (one magnitude scale per sample);
    None when the sample has no (readable) flow."""
    from .cachetimes import nearest_indices
    from .flow import MEMBER, decode_member, dequantise, flow_to_rgb
    if MEMBER not in raw:
        return None
    try:
        q, scale, cached, meta = decode_member(raw[MEMBER])
        index = nearest_indices(cached, torch.from_numpy(times), float(meta.get("duration", "inf")),
                                float(meta.get("fps", "1")), what="flow field")
    except ValueError:
        return None
    return [flow_to_rgb(dequantise(q[i], scale).numpy(), max_magnitude=scale) for i in index.tolist()]


def contact_sheet(shards: str, out_png: str, num_samples: int = 8, frames_per_sample: int = 4,
                  limits: MemberLimits | None = None) -> int:
    """A PNG grid: one row per sample (the first `num_samples` with video), a few frames
    across its duration, its caption as the row title; beside each frame its cached optical
    flow when the sample has some (`shards add-flow`), colour-wheel coded (hue: direction,
    saturation: speed, white: still). Returns the number of rows drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for raw in iter_raw(shards, limits):
        data = _video(raw)
        if data is None:
            continue
        meta = _meta(raw)
        try:
            duration = float(meta.get("duration") or probe(data, check_decode=False).duration)
            fps = frames_per_sample / max(duration, 1e-3)
            clip = decode_window(data, 0.0, frames_per_sample, fps, size=(96, 128), audio_rate=None)
        except DecodeError:
            continue
        flows = _flow_images(raw, np.arange(frames_per_sample) / fps)
        rows.append((raw["__key__"], str(meta.get("caption") or ""), clip.frames, flows))
        if len(rows) >= num_samples:
            break
    columns = frames_per_sample * (2 if any(r[3] is not None for r in rows) else 1)
    fig, axes = plt.subplots(max(1, len(rows)), columns, squeeze=False,
                             figsize=(2 * columns, 1.8 * max(1, len(rows))))
    for ax in axes.ravel():
        ax.axis("off")
    step = columns // frames_per_sample
    for r, (key, caption, frames, flows) in enumerate(rows):
        for c in range(frames_per_sample):
            axes[r, c * step].imshow(frames[c])
            if flows is not None:
                axes[r, c * step + 1].imshow(flows[c])
        axes[r, 0].set_title(f"{key}: {caption[:60]}" + (" | flow beside each frame" if flows else ""),
                             fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return len(rows)


def verify_shards(shards: str, size: int = 32, limits: MemberLimits | None = None) -> dict:
    """Decode every frame and the audio of every sample; {checked, failed: [{shard, key, reason}]}.
    Samples without a video member (video2dataset's failed downloads) are counted, not failures;
    a member over `limits` or unusable metadata is a failure."""
    checked, missing, failed = 0, 0, []
    for raw in iter_raw(shards, limits):
        if REFUSED in raw or "json" in raw:
            problems: list[dict] = []
            _meta(raw, problems)
            if problems:
                checked += 1
                failed.extend(problems)
                continue
        data = _video(raw)
        if data is None:
            missing += 1
            continue
        checked += 1
        try:
            decode_all(data, size=size, audio_rate=8000)
        except DecodeError as e:
            failed.append({"shard": raw.get("__url__"), "key": raw.get("__key__"), "reason": str(e)})
    return {"checked": checked, "without_video": missing, "failed": failed}
