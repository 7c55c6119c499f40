"""MSR-VTT (Xu et al. 2016). Inputs, any of:
- train_val_videodatainfo.json / test_videodatainfo.json: `videos` [{video_id, split, url,
  "start time", "end time", category, id}] and `sentences` [{caption, video_id, sen_id}]
  (20 captions per video);
- MSRVTT_JSFUSION_test.csv (columns key, vid_key, video_id, sentence): the 1k-A test split of Yu
  et al. 2018 (JSFusion), one sentence per video, on which R@1/5/10/MedR are reported.
One entry per video: `captions` (all its sentences), `caption` (the first), `split` (train,
validate, test from the JSON files). Videos of the 1k-A split get a separate entry set in
captions_test_1k_a.jsonl with only the JSFusion sentence, so retrieval on those shards has one
query per video as in the papers. Path `<video_id>.mp4` (TrainValVideo/, TestVideo/ or a single
videos/all/ folder: `--videos` finds them by stem)."""

from __future__ import annotations

from pathlib import Path

from .common import Conversion, read_csv_rows, read_json


def convert(files: list[Path], conv: Conversion) -> None:
    by_video: dict[str, dict] = {}
    for path in files:
        if Path(path).suffix.lower() == ".csv":
            _jsfusion(path, conv)
            continue
        data = read_json(path)
        if not isinstance(data, dict) or "videos" not in data:
            conv.problem(path, "no 'videos' list: not a *_videodatainfo.json file", action="file skipped")
            continue
        for i, video in enumerate(data.get("videos", [])):
            vid = video.get("video_id") if isinstance(video, dict) else None
            if not vid:
                conv.problem(path, "video without video_id", item=f"videos[{i}]")
                continue
            entry = {"id": vid, "video": f"{vid}.mp4", "split": video.get("split", ""), "captions": []}
            for key, name in (("category", "category"), ("url", "url"), ("start time", "start"), ("end time", "end")):
                if key in video:
                    entry[name] = video[key]
            if conv.add(entry, path, item=f"videos[{i}]"):
                by_video[vid] = entry
        for i, sentence in enumerate(data.get("sentences", [])):
            vid = sentence.get("video_id") if isinstance(sentence, dict) else None
            text = (sentence.get("caption") or "").strip() if isinstance(sentence, dict) else ""
            if vid not in by_video:
                conv.problem(path, f"sentence for unknown video {vid!r}", item=f"sentences[{i}]")
            elif not text:
                conv.problem(path, "empty caption", item=f"sentences[{i}]")
            else:
                by_video[vid]["captions"].append(text)
    for vid, entry in by_video.items():
        if entry["captions"]:
            entry["caption"] = entry["captions"][0]
        else:
            conv.problem(entry["_file"], f"video {vid} has no caption", item=entry["_item"], action="kept")


def _jsfusion(path: Path, conv: Conversion) -> None:
    for line, row in read_csv_rows(path, conv, ("video_id", "sentence")):
        vid = row["video_id"]
        entry = {"id": f"{vid}_1k_a", "video": f"{vid}.mp4", "split": "test_1k_a", "caption": row["sentence"],
                 "video_id": vid}
        conv.add(entry, path, line)
