"""Ego4D narrations (Grauman et al. 2022), for LaViLa: narration.json, {video_uid:
{narration_pass_1: {narrations: [{timestamp_sec, timestamp_frame, narration_text,
annotation_uid}], summaries: [...]}, narration_pass_2: {...}, status}}. One entry per video
(`<video_uid>.mp4`, the layout of the Ego4D CLI's full_scale download) with `narrations`.

A narration is a point in time; its clip is EgoVLP's contextual window (Lin et al. 2022, the
clips LaViLa trains on): [t - b/(2a), t + b/(2a)], b the mean gap between consecutive narrations
of that video, a the mean of b over all videos of the file (or `alpha` when given). `shards build
--max-seconds` then cuts the long videos into clips and re-times their narrations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import Conversion, read_json


def convert(files: list[Path], conv: Conversion, passes: tuple[str, ...] = ("narration_pass_1",),
            alpha: float | None = None) -> None:
    conv.split_key = None
    videos = []
    for path in files:
        data = read_json(path)
        if isinstance(data, dict) and "videos" in data and isinstance(data["videos"], dict):
            data = data["videos"]
        if not isinstance(data, dict):
            conv.problem(path, "not an object of video_uid -> narrations", action="file skipped")
            continue
        for uid, record in data.items():
            points = []
            for name in passes:
                narrations = (record.get(name) or {}).get("narrations", []) if isinstance(record, dict) else []
                for j, n in enumerate(narrations):
                    item = f"{uid}.{name}.narrations[{j}]"
                    text = (n.get("narration_text") or "").strip() if isinstance(n, dict) else ""
                    t = n.get("timestamp_sec") if isinstance(n, dict) else None
                    if not text:
                        conv.problem(path, "empty narration_text", item=item)
                    elif not isinstance(t, (int, float)) or t < 0:
                        conv.problem(path, f"timestamp_sec {t!r} is not a time", item=item)
                    else:
                        points.append((float(t), text, n.get("annotation_uid")))
            if not points:
                conv.problem(path, f"video {uid} has no usable narration", item=uid)
                continue
            points.sort(key=lambda p: p[0])
            gaps = np.diff([p[0] for p in points])
            videos.append((path, uid, points, float(gaps.mean()) if len(gaps) else None))
    betas = [b for *_, b in videos if b]
    a = alpha or (float(np.mean(betas)) if betas else 1.0)
    conv.notes.append(f"EgoVLP window scale alpha = {a:.3f} s")
    for path, uid, points, beta in videos:
        half = (beta or a) / (2 * a)
        narrations = [{"start": round(max(0.0, t - half), 3), "end": round(t + half, 3), "text": text}
                      for t, text, _ in points]
        conv.add({"id": uid, "video": f"{uid}.mp4", "narrations": narrations}, path, item=uid)
