"""Kinetics-400/600/700 (Kay et al. 2017; Carreira et al. 2018, 2019): the release CSVs
(train.csv, validate.csv, test.csv) with columns label, youtube_id, time_start, time_end, split
(the test CSV has no label). One entry per 10-second clip, id `<youtube_id>_<start:06d>_<end:06d>`,
path `<split>/<id>.mp4` as in the CVDF archives (k400/train/abseiling... flattened into the split
folder); a folder of clips in any other layout is found by file stem (`--videos`)."""

from __future__ import annotations

from pathlib import Path

from .common import YOUTUBE, Conversion, read_csv_rows

SPLITS = {"train": "train", "validate": "val", "val": "val", "validation": "val", "test": "test"}


def convert(files: list[Path], conv: Conversion) -> None:
    for path in files:
        for line, row in read_csv_rows(path, conv, ("youtube_id", "time_start", "time_end")):
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except ValueError:
                conv.problem(path, f"time_start/time_end not numbers ({row['time_start']!r}, {row['time_end']!r})", line)
                continue
            if end <= start:
                conv.problem(path, f"time_end {end} is not after time_start {start}", line)
                continue
            split = SPLITS.get(row.get("split", "").lower(), row.get("split") or Path(path).stem)
            label = row.get("label", "")
            if split != "test" and not label:
                conv.problem(path, f"no label in the {split} split", line)
                continue
            clip_id = f"{row['youtube_id']}_{start:06d}_{end:06d}"
            entry = {"id": clip_id, "video": f"{split}/{clip_id}.mp4", "split": split, "youtube_id": row["youtube_id"],
                     "time_start": start, "time_end": end}
            if label:
                entry["label"] = label
            if conv.add(entry, path, line):
                conv.downloads.append({"url": YOUTUBE.format(row["youtube_id"]), "id": clip_id,
                                       "clips": [[start, end]], "split": split})
