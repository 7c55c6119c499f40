"""AudioSet (Gemmeke et al. 2017): the segment CSVs (balanced_train_segments.csv,
unbalanced_train_segments.csv, eval_segments.csv): three comment lines starting with '#' (the
third names the columns: YTID, start_seconds, end_seconds, positive_labels), then rows such as
`--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"` (a space after each comma, the label list
quoted); and class_labels_indices.csv (index, mid, display_name) for the names. One entry per
10-second segment, id `<YTID>_<start ms>`, `labels` (display names) and `label_mids`; a
multi-label set, so no single `label`. video2dataset cuts the segment from the YouTube video."""

from __future__ import annotations

from pathlib import Path

from .common import YOUTUBE, Conversion, read_csv_rows

COLUMNS = ["YTID", "start_seconds", "end_seconds", "positive_labels"]


def convert(files: list[Path], conv: Conversion) -> None:
    names = {}
    for path in [p for p in files if "class_labels" in Path(p).name]:
        for _, row in read_csv_rows(path, conv, ("mid", "display_name")):
            names[row["mid"]] = row["display_name"]
    for path in [p for p in files if "class_labels" not in Path(p).name]:
        stem = Path(path).stem
        split = "eval" if stem.startswith("eval") else "balanced_train" if "balanced" in stem and "unbalanced" not in stem \
            else "unbalanced_train"
        for line, row in read_csv_rows(path, conv, tuple(COLUMNS), comment="#", skipinitialspace=True,
                                       fieldnames=COLUMNS):
            try:
                start, end = float(row["start_seconds"]), float(row["end_seconds"])
            except ValueError:
                conv.problem(path, f"start/end not numbers ({row['start_seconds']!r}, {row['end_seconds']!r})", line)
                continue
            mids = [m.strip() for m in row["positive_labels"].split(",") if m.strip()]
            unknown = [m for m in mids if names and m not in names]
            if unknown:
                conv.problem(path, f"label(s) {unknown} not in class_labels_indices.csv", line, action="kept")
            clip_id = f"{row['YTID']}_{int(round(start * 1000))}"
            entry = {"id": clip_id, "video": f"{split}/{clip_id}.mp4", "split": split, "youtube_id": row["YTID"],
                     "clip": [start, end], "label_mids": mids}
            if names:
                entry["labels"] = [names.get(m, m) for m in mids]
            if conv.add(entry, path, line):
                conv.downloads.append({"url": YOUTUBE.format(row["YTID"]), "id": clip_id, "clips": [[start, end]],
                                       "split": split})
