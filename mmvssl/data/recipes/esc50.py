"""ESC-50 (Piczak 2015): meta/esc50.csv with columns filename, fold, target, category, esc10,
src_file, take; the clips in audio/<filename> (5 s, 44.1 kHz mono WAV). One entry per clip with
`label` (the category, as eval/tasks/esc50.yaml lists it), `fold` (1-5) and `target`; the task
runs the five folds (train on four, test on the fifth) and reports the mean.

`shards build` needs a video stream, so the clips are first wrapped into MP4 files with a still
black picture (`mmvssl datasets wrap-audio`, media.py); the entries point at `audio/<stem>.mp4`,
and `--videos` finds the wrapped files by stem."""

from __future__ import annotations

from pathlib import Path

from .common import Conversion, read_csv_rows


def convert(files: list[Path], conv: Conversion) -> None:
    conv.split_key = None
    for path in files:
        targets: dict[str, str] = {}
        for line, row in read_csv_rows(path, conv, ("filename", "fold", "target", "category")):
            if row["fold"] not in {"1", "2", "3", "4", "5"}:
                conv.problem(path, f"fold {row['fold']!r} is not 1-5", line)
                continue
            seen = targets.setdefault(row["category"], row["target"])
            if seen != row["target"]:
                conv.problem(path, f"category {row['category']!r} has target {row['target']} here, {seen} before",
                             line, action="kept")
            stem = Path(row["filename"]).stem
            entry = {"id": stem, "video": f"audio/{stem}.mp4", "label": row["category"], "fold": int(row["fold"]),
                     "target": int(row["target"]), "esc10": row.get("esc10", "").lower() == "true",
                     "source_file": f"audio/{row['filename']}"}
            conv.add(entry, path, line)
