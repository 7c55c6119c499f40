"""WebVid-2M / 10M (Bain et al. 2021): results_2M_train.csv, results_2M_val.csv,
results_10M_train.csv with columns videoid, contentUrl, duration, page_dir, name (their order
differs between releases; columns are read by name). One entry per video, caption = name, path
`<page_dir>/<videoid>.mp4` (the layout of the release's download script); video2dataset reads
the URLs."""

from __future__ import annotations

from pathlib import Path

from .common import Conversion, read_csv_rows


def convert(files: list[Path], conv: Conversion) -> None:
    for path in files:
        split = "val" if "_val" in Path(path).stem else "train"
        for line, row in read_csv_rows(path, conv, ("videoid", "contentUrl", "name")):
            page = row.get("page_dir") or "videos"
            entry = {"id": row["videoid"], "video": f"{page}/{row['videoid']}.mp4", "caption": row["name"],
                     "split": split}
            if row.get("duration"):
                entry["webvid_duration"] = row["duration"]
            if conv.add(entry, path, line):
                conv.downloads.append({"url": row["contentUrl"], "id": row["videoid"], "caption": row["name"],
                                       "split": split})
