"""HowTo100M (Miech et al. 2019): caption.json, {video_id: {start: [...], end: [...], text: [...]}}
(the ASR segments), and optionally HowTo100M_v1.csv (video_id, category_1, category_2, rank,
task_id). One entry per video (`<video_id>.mp4`) with its ASR segments as `narrations`; MIL-NCE
draws the candidates nearest the sampled window. Empty or inverted segments are reported and
left out of the video's narrations; the video is kept if any segment is left."""

from __future__ import annotations

from pathlib import Path

from .common import YOUTUBE, Conversion, read_csv_rows, read_json


def convert(files: list[Path], conv: Conversion) -> None:
    conv.split_key = None
    categories = {}
    for path in [p for p in files if Path(p).suffix.lower() == ".csv"]:
        for _, row in read_csv_rows(path, conv, ("video_id",)):
            categories[row["video_id"]] = {k: row[k] for k in ("category_1", "category_2", "task_id") if row.get(k)}
    for path in [p for p in files if Path(p).suffix.lower() != ".csv"]:
        data = read_json(path)
        if not isinstance(data, dict):
            conv.problem(path, "not an object of video_id -> {start, end, text}", action="file skipped")
            continue
        for vid, asr in data.items():
            if not isinstance(asr, dict) or not all(isinstance(asr.get(k), list) for k in ("start", "end", "text")):
                conv.problem(path, "no start/end/text lists", item=vid)
                continue
            lengths = {len(asr[k]) for k in ("start", "end", "text")}
            if len(lengths) > 1:
                conv.problem(path, f"start/end/text lengths differ ({len(asr['start'])}, {len(asr['end'])}, "
                                   f"{len(asr['text'])}); the shortest is used", item=vid, action="kept")
            narrations = []
            for j, (s, e, text) in enumerate(zip(asr["start"], asr["end"], asr["text"])):
                text = str(text or "").strip()
                try:
                    s, e = float(s), float(e)
                except (TypeError, ValueError):
                    conv.problem(path, f"segment times {s!r}, {e!r} are not numbers", item=f"{vid}[{j}]")
                    continue
                if not text:
                    conv.problem(path, "empty ASR segment", item=f"{vid}[{j}]")
                elif e < s:
                    conv.problem(path, f"segment ends ({e}) before it starts ({s})", item=f"{vid}[{j}]")
                else:
                    narrations.append({"start": s, "end": e, "text": text})
            if not narrations:
                conv.problem(path, "no usable ASR segment", item=vid)
                continue
            entry = {"id": vid, "video": f"{vid}.mp4", "narrations": narrations, **categories.get(vid, {})}
            if conv.add(entry, path, item=vid):
                conv.downloads.append({"url": YOUTUBE.format(vid), "id": vid})
