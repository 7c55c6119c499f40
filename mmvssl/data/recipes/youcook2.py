"""YouCook2 (Zhou et al. 2018): youcookii_annotations_trainval.json, `database` {youtube_id:
{duration, subset (training / validation), recipe_type, video_url, annotations [{segment: [start,
end], id, sentence}]}}. One entry per annotated segment (a clip), id `<youtube_id>_<id>`, caption
the sentence, `clip` [start, end] seconds into the video, `split` train / val. Text-to-video
retrieval is reported on the validation clips (Miech et al. 2019, HowTo100M: 3,350 clips).

Clips are cut at download time: one video2dataset row per clip (url, clips [[start, end]], id),
so every downloaded file is one clip and carries its id (`--videos` finds it)."""

from __future__ import annotations

from pathlib import Path

from .common import YOUTUBE, Conversion, read_json

SUBSETS = {"training": "train", "validation": "val", "testing": "test"}


def convert(files: list[Path], conv: Conversion) -> None:
    for path in files:
        data = read_json(path)
        database = data.get("database") if isinstance(data, dict) else None
        if not isinstance(database, dict):
            conv.problem(path, "no 'database' object: not youcookii_annotations_*.json", action="file skipped")
            continue
        for vid, video in database.items():
            if not isinstance(video, dict):
                conv.problem(path, "video record is not an object", item=f"database.{vid}")
                continue
            split = SUBSETS.get(video.get("subset", ""), video.get("subset", ""))
            url = video.get("video_url") or YOUTUBE.format(vid)
            duration = video.get("duration")
            for j, ann in enumerate(video.get("annotations", [])):
                item = f"database.{vid}.annotations[{j}]"
                text = (ann.get("sentence") or "").strip()
                seg = ann.get("segment")
                if not text:
                    conv.problem(path, "empty sentence", item=item)
                    continue
                if not (isinstance(seg, list) and len(seg) == 2 and float(seg[0]) < float(seg[1])):
                    conv.problem(path, f"segment {seg!r} is not [start, end] with start < end", item=item)
                    continue
                if duration and float(seg[1]) > float(duration) + 1:
                    conv.problem(path, f"segment ends at {seg[1]} s, after the video's {duration} s", item=item,
                                 action="kept")
                clip_id = f"{vid}_{ann.get('id', j)}"
                entry = {"id": clip_id, "video": f"{split}/{clip_id}.mp4", "caption": text, "split": split,
                         "youtube_id": vid, "clip": [float(seg[0]), float(seg[1])],
                         "recipe_type": video.get("recipe_type")}
                if conv.add(entry, path, item=item):
                    conv.downloads.append({"url": url, "id": clip_id, "clips": [[float(seg[0]), float(seg[1])]],
                                           "caption": text, "split": split})
