"""What every dataset recipe shares: the conversion result, its report of awkward rows, reading
the official files without crashing on them, finding the downloaded videos, and writing it all.

A converter turns a public release's annotation files into the input of `mmvssl shards build`:
`captions.jsonl` (one object per video or clip, datasets/README.md), one `captions_<split>.jsonl`
per disjoint split, `splits/<split>.txt` (the ids, one per line), `video2dataset.csv` when the
videos come from URLs, and `convert_report.json`. Every row it cannot use as written is reported
with its file and line (or, in a JSON file, its item), never dropped in silence.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import MmvsslError

YOUTUBE = "https://www.youtube.com/watch?v={}"


@dataclass
class Conversion:
    """The result of one converter."""
    dataset: str
    entries: list[dict] = field(default_factory=list)  # captions.jsonl objects, each with an `id`
    problems: list[dict] = field(default_factory=list)  # {file, line | item, reason, action}
    downloads: list[dict] = field(default_factory=list)  # video2dataset rows: url, id (+ caption, clips)
    arrays: dict = field(default_factory=dict)  # extra .npz files: name -> {array name: numpy array}
    notes: list[str] = field(default_factory=list)
    split_key: str | None = "split"  # entry key naming a disjoint split (None: splits are metadata)
    _seen: dict = field(default_factory=dict)

    def problem(self, file, reason: str, line: int | None = None, item: str | None = None,
                action: str = "skipped") -> None:
        p = {"file": Path(str(file)).name, "reason": reason, "action": action}
        if line is not None:
            p["line"] = line
        if item is not None:
            p["item"] = item
        self.problems.append(p)

    def add(self, entry: dict, file, line: int | None = None, item: str | None = None) -> bool:
        """Add an entry unless its id was added before (a duplicate is reported, the first kept)."""
        where = f"line {line}" if line is not None else item
        first = self._seen.get(entry["id"])
        if first is not None:
            self.problem(file, f"duplicate id {entry['id']!r} (first at {first}); the first is kept", line, item)
            return False
        self._seen[entry["id"]] = where
        entry.update(_file=str(file), _line=line, _item=item)  # for later reports; not written
        self.entries.append(entry)
        return True


def read_csv_rows(path: Path, conv: Conversion, required: tuple[str, ...], comment: str | None = None,
                  skipinitialspace: bool = False, fieldnames: list[str] | None = None):
    """(line number, row dict) for every data row; rows missing a required value are reported.
    Undecodable bytes are replaced and reported; comment lines (AudioSet's '#') are skipped."""
    path = Path(path)
    if not path.is_file():
        raise MmvsslError(f"annotation file not found: {path}")
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    lines = text.splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, start=1)
                if line.strip() and not (comment and line.lstrip().startswith(comment))]
    reader = csv.reader([line for _, line in numbered], skipinitialspace=skipinitialspace)
    header = fieldnames
    for (line_no, raw), values in zip(numbered, reader):
        if header is None:
            header = [h.strip() for h in values]
            missing = [c for c in required if c not in header]
            if missing:
                raise MmvsslError(f"{path}:{line_no}: header lacks column(s) {missing} (has {header}); "
                                  f"is this the official file?")
            continue
        if "\ufffd" in raw:
            conv.problem(path, "bytes that are not UTF-8 (replaced by U+FFFD)", line_no, action="kept")
        if len(values) != len(header):
            conv.problem(path, f"{len(values)} fields where the header has {len(header)}", line_no)
            continue
        row = {k: v.strip() for k, v in zip(header, values)}
        empty = [c for c in required if not row.get(c)]
        if empty:
            conv.problem(path, f"empty {', '.join(empty)}", line_no)
            continue
        yield line_no, row


def read_json(path: Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise MmvsslError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig", errors="replace"))
    except json.JSONDecodeError as e:
        raise MmvsslError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def seconds(value) -> float:
    """Seconds from a number or an 'HH:MM:SS.ff' timestamp (EK-100)."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if ":" in text:
        parts = [float(p) for p in text.split(":")]
        total = 0.0
        for p in parts:
            total = total * 60 + p
        return total
    return float(text)


class VideoIndex:
    """The videos found under a folder: by relative path, by file stem, and by the `id` column
    video2dataset saved beside each downloaded file (`save_additional_columns: [id]`)."""

    SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".wav", ".flac", ".mp3", ".ogg"}

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MmvsslError(f"videos folder not found: {self.root}")
        self.paths, self.stems, self.ids = set(), {}, {}
        for p in sorted(self.root.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(self.root).as_posix()
            if p.suffix.lower() in self.SUFFIXES:
                self.paths.add(rel)
                self.stems.setdefault(p.stem, rel)
            elif p.suffix == ".json":
                self._sidecar(p)

    def _sidecar(self, path: Path) -> None:
        try:
            meta = json.loads(path.read_text(errors="replace"))
        except (json.JSONDecodeError, OSError):
            return
        if not isinstance(meta, dict) or meta.get("status", "success") != "success" or "id" not in meta:
            return
        for suffix in (".mp4", ".webm", ".mkv"):
            video = path.with_suffix(suffix)
            if video.is_file():
                self.ids.setdefault(str(meta["id"]), video.relative_to(self.root).as_posix())

    def find(self, entry_id: str, layout_path: str) -> str | None:
        if layout_path in self.paths:
            return layout_path
        if entry_id in self.ids:
            return self.ids[entry_id]
        return self.stems.get(Path(layout_path).stem) or self.stems.get(entry_id)


def resolve_videos(conv: Conversion, videos: str | Path | None) -> None:
    """With a videos folder: point every entry at its file, or report it missing (and leave it out
    of captions.jsonl; it stays in the report). Without one: entries keep the official layout."""
    if videos is None:
        return
    index = VideoIndex(videos)
    kept = []
    for entry in conv.entries:
        found = index.find(entry["id"], entry["video"])
        if found is None:
            conv.problem(entry["_file"], f"video not found under {videos} (expected {entry['video']})",
                         entry.get("_line"), entry.get("_item"), action="left out")
        else:
            entry["video"] = found
            kept.append(entry)
    conv.entries = kept


def write_conversion(conv: Conversion, out: str | Path) -> dict:
    """Write captions.jsonl, captions_<split>.jsonl, splits/, video2dataset.csv, extra .npz files
    and convert_report.json; return the report."""
    import numpy as np

    out = Path(out)
    (out / "splits").mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in e.items() if not k.startswith("_")} for e in conv.entries]
    _write_jsonl(out / "captions.jsonl", clean)
    splits: dict[str, list[dict]] = {}
    if conv.split_key:
        for e in clean:
            if e.get(conv.split_key):
                splits.setdefault(str(e[conv.split_key]), []).append(e)
    for name, items in splits.items():
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        _write_jsonl(out / f"captions_{safe}.jsonl", items)
        (out / "splits" / f"{safe}.txt").write_text("".join(f"{e['id']}\n" for e in items))
    if conv.downloads:
        columns = list(dict.fromkeys(k for row in conv.downloads for k in row))
        with open(out / "video2dataset.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in conv.downloads:
                writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    for name, arrays in conv.arrays.items():
        np.savez(out / name, **arrays)
    report = {"dataset": conv.dataset, "entries": len(clean), "splits": {k: len(v) for k, v in splits.items()},
              "downloads": len(conv.downloads), "files": sorted(conv.arrays), "notes": conv.notes,
              "num_problems": len(conv.problems), "problems": conv.problems}
    (out / "convert_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _write_jsonl(path: Path, items: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
