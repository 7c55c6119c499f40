"""UCF101 (Soomro et al. 2012) and HMDB51 (Kuehne et al. 2011): one entry per video with its class
and its role in each of the three official splits, as metadata `split1`, `split2`, `split3`
(train / test, HMDB51 also `unused`), so one shard set serves all three splits
(eval/tasks/ucf101.yaml and hmdb51.yaml run each split and report the mean).

UCF101: the folder ucfTrainTestlist/ with classInd.txt ("1 ApplyEyeMakeup"), trainlist0k.txt
("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1") and testlist0k.txt (path only); videos as in
UCF-101/ (`<Class>/v_<Class>_gXX_cYY.avi`). Clips of one group (`v_<Class>_gXX`: cut from one long
video, UCF101's "groups") share the metadata `video_id`, the group, as CoCLR's
process_data/data/ucf101/video_source.json keys them (TengdaHan/CoCLR), so methods that treat clips
of one source video alike (coclr's same-video positives) see them as one video.
HMDB51: the folder testTrainMulti_7030_splits/ with `<class>_test_split<k>.txt`, lines
"<video>.avi <tag>" with tag 1 = train, 2 = test, 0 = unused; videos as `<class>/<video>.avi` (the
per-class rar archives unpacked)."""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import MmvsslError
from .common import Conversion

HMDB_TAGS = {"0": "unused", "1": "train", "2": "test"}
UCF_CLIP = re.compile(r"^(?P<group>v_.+_g\d+)_c\d+$")  # v_<Class>_g08_c01: group v_<Class>_g08, clip 1


def ucf101_group(stem: str) -> str | None:
    """The group (source video) of a UCF101 clip name, `v_ApplyEyeMakeup_g08_c01` -> `v_ApplyEyeMakeup_g08`
    (the keys of CoCLR's video_source.json); None for a name not of that form."""
    m = UCF_CLIP.match(stem)
    return m["group"] if m else None


def _lines(path: Path, conv: Conversion):
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    for line_no, line in enumerate(text.splitlines(), start=1):
        if "\ufffd" in line:
            conv.problem(path, "bytes that are not UTF-8 (replaced by U+FFFD)", line_no, action="kept")
        if line.strip():
            yield line_no, line.strip()


def _folder(path: Path, what: str) -> Path:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        raise MmvsslError(f"{what} folder not found: {path}")
    return folder


def convert_ucf101(files: list[Path], conv: Conversion) -> None:
    conv.split_key = None
    folder = _folder(files[0], "ucfTrainTestlist")
    class_file = folder / "classInd.txt"
    if not class_file.is_file():
        raise MmvsslError(f"{class_file} not found (expected the ucfTrainTestlist folder)")
    classes = {}
    for line_no, line in _lines(class_file, conv):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            conv.problem(class_file, f"expected '<index> <class>', got {line!r}", line_no)
            continue
        classes[parts[1]] = int(parts[0])
    videos: dict[str, dict] = {}
    for k in (1, 2, 3):
        for role, name in (("train", f"trainlist0{k}.txt"), ("test", f"testlist0{k}.txt")):
            path = folder / name
            if not path.is_file():
                conv.problem(path, "split file missing; this split is left out", action="left out")
                continue
            for line_no, line in _lines(path, conv):
                parts = line.split()
                rel = parts[0].replace("\\", "/")
                label = rel.split("/")[0] if "/" in rel else None
                if label not in classes:
                    conv.problem(path, f"class {label!r} of {rel!r} is not in classInd.txt", line_no)
                    continue
                if role == "train" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) != classes[label]:
                    conv.problem(path, f"class index {parts[1]} differs from classInd.txt's {classes[label]} for "
                                       f"{label}; the folder name is used", line_no, action="kept")
                entry = videos.get(rel)
                if entry is None:
                    entry = {"id": Path(rel).stem, "video": rel, "label": label}
                    group = ucf101_group(entry["id"])
                    if group is None:
                        conv.problem(path, f"{rel!r} is not named v_<Class>_gXX_cYY: no video_id (its group) "
                                           f"is written", line_no, action="kept")
                    else:
                        entry["video_id"] = group
                    if conv.add(entry, path, line_no):
                        videos[rel] = entry
                    else:
                        continue
                key = f"split{k}"
                if key in entry and entry[key] != role:
                    conv.problem(path, f"{rel} is already in split {k}'s {entry[key]} list", line_no)
                    continue
                if key in entry:
                    conv.problem(path, f"{rel} listed twice in split {k}", line_no)
                    continue
                entry[key] = role


def convert_hmdb51(files: list[Path], conv: Conversion) -> None:
    conv.split_key = None
    folder = _folder(files[0], "testTrainMulti_7030_splits")
    pattern = re.compile(r"^(?P<label>.+)_test_split(?P<k>[123])\.txt$")
    split_files = sorted(p for p in folder.iterdir() if pattern.match(p.name))
    if not split_files:
        raise MmvsslError(f"{folder}: no <class>_test_split<k>.txt files (expected testTrainMulti_7030_splits)")
    per_class: dict[str, set] = {}
    videos: dict[str, dict] = {}
    for path in split_files:
        m = pattern.match(path.name)
        label, k = m["label"], int(m["k"])
        per_class.setdefault(label, set()).add(k)
        for line_no, line in _lines(path, conv):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in HMDB_TAGS:
                conv.problem(path, f"expected '<video>.avi <0|1|2>', got {line!r}", line_no)
                continue
            rel = f"{label}/{parts[0]}"
            entry = videos.get(rel)
            if entry is None:
                entry = {"id": Path(parts[0]).stem, "video": rel, "label": label}
                if not conv.add(entry, path, line_no):
                    continue
                videos[rel] = entry
            if f"split{k}" in entry:
                conv.problem(path, f"{parts[0]} listed twice in split {k}", line_no)
                continue
            entry[f"split{k}"] = HMDB_TAGS[parts[1]]
    for label, ks in sorted(per_class.items()):
        for k in sorted({1, 2, 3} - ks):
            conv.problem(folder / f"{label}_test_split{k}.txt", "split file missing for this class",
                         action=f"its videos have no split{k}")
