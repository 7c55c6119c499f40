"""Build webdataset tar shards from a folder of videos and a captions file.

Layout (video2dataset-compatible, readable by plain `tar` and `webdataset`): per sample
`<key>.mp4` (the original bytes), `<key>.json` (metadata) and `<key>.txt` (caption, when
there is one). Beside the tars: `sizes.json` (samples per shard) and `build_report.json`
(every input accounted for: accepted with its key, rejected with the reason).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from ..errors import MmvsslError
from .decode import DecodeError, probe

MEDIA_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"}


@dataclass
class BuildReport:
    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def reject(self, source: str, reason: str, line: int | None = None) -> None:
        item = {"source": source, "reason": reason}
        if line is not None:
            item["line"] = line
        self.rejected.append(item)

    def to_dict(self) -> dict:
        return {"num_accepted": len(self.accepted), "num_rejected": len(self.rejected),
                "accepted": self.accepted, "rejected": self.rejected}


def read_entries(videos_dir: Path, captions: Path | None, report: BuildReport) -> list[tuple[int | None, dict]]:
    """(line number, entry) pairs; malformed lines go straight to the report."""
    if captions is None:
        files = sorted(p for p in videos_dir.rglob("*") if p.suffix.lower() in MEDIA_SUFFIXES and p.is_file())
        return [(None, {"video": str(p.relative_to(videos_dir))}) for p in files]
    if not captions.is_file():
        raise MmvsslError(f"captions file not found: {captions}")
    entries = []
    if captions.suffix.lower() == ".csv":
        with open(captions, newline="") as f:
            for line_no, row in enumerate(csv.DictReader(f), start=2):
                entry = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
                if isinstance(entry.get("narrations"), str):
                    try:
                        entry["narrations"] = json.loads(entry["narrations"])
                    except json.JSONDecodeError:
                        report.reject(f"{captions}:{line_no}", "narrations column is not valid JSON", line_no)
                        continue
                entries.append((line_no, entry))
    else:
        with open(captions, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    report.reject(f"{captions}:{line_no}", f"malformed JSON ({e.msg})", line_no)
                    continue
                entries.append((line_no, entry))
    valid = []
    for line_no, entry in entries:
        where = f"{captions}:{line_no}"
        if not isinstance(entry, dict) or not isinstance(entry.get("video"), str) or not entry["video"]:
            report.reject(where, "entry has no 'video' path", line_no)
        elif "caption" in entry and not isinstance(entry["caption"], str):
            report.reject(where, "'caption' is not a string", line_no)
        elif "narrations" in entry and not _valid_narrations(entry["narrations"]):
            report.reject(where, "'narrations' must be a list of {start, end, text} with start <= end", line_no)
        else:
            valid.append((line_no, entry))
    return valid


def _valid_narrations(items) -> bool:
    if not isinstance(items, list):
        return False
    try:
        return all(isinstance(n, dict) and isinstance(n.get("text"), str)
                   and float(n["start"]) <= float(n["end"]) for n in items)
    except (KeyError, TypeError, ValueError):
        return False


def build_shards(videos_dir: str | os.PathLike, out_dir: str | os.PathLike, captions: str | os.PathLike | None = None,
                 samples_per_shard: int = 256, max_pixels: int = 4096 * 2160, max_seconds: float = 4 * 3600.0,
                 progress: bool = False) -> dict:
    """Probe every listed video, write the good ones into shards, report every input."""
    videos_dir, out_dir = Path(videos_dir), Path(out_dir)
    if not videos_dir.is_dir():
        raise MmvsslError(f"videos folder not found: {videos_dir}")
    report = BuildReport()
    entries = read_entries(videos_dir, Path(captions) if captions else None, report)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("shard-*.tar"), out_dir / "sizes.json", out_dir / "build_report.json"]:
        old.unlink(missing_ok=True)  # a rebuild replaces our own files, nothing else in the folder
    sizes: dict[str, int] = {}
    writer, shard_name, seen = None, None, {}
    iterator = entries
    if progress:
        from tqdm import tqdm
        iterator = tqdm(entries, desc="shards build", unit="video")
    for index, (line_no, entry) in enumerate(iterator):
        source = entry["video"]
        path = videos_dir / source
        resolved = str(path.resolve())
        if resolved in seen:
            report.reject(source, f"duplicate entry of line {seen[resolved]}", line_no)
            continue
        seen[resolved] = line_no
        try:
            if not path.is_file():
                raise DecodeError("file not found")
            if path.stat().st_size == 0:
                raise DecodeError("empty file (0 bytes)")
            data = path.read_bytes()
            info = probe(data, max_pixels=max_pixels, max_seconds=max_seconds)
        except DecodeError as e:
            report.reject(source, str(e), line_no)
            continue
        except OSError as e:
            report.reject(source, f"unreadable ({e.strerror or e})", line_no)
            continue
        key = f"{index:09d}"
        meta = {k: v for k, v in entry.items() if k != "video"}
        meta.update(source=source, **info.to_dict())
        if writer is None or sizes[shard_name] >= samples_per_shard:
            if writer is not None:
                writer.close()
            shard_name = f"shard-{len(sizes):06d}.tar"
            writer, sizes[shard_name] = wds.TarWriter(str(out_dir / shard_name)), 0
        member = {"__key__": key, path.suffix.lower().lstrip("."): data,
                  "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
        if isinstance(entry.get("caption"), str):
            member["txt"] = entry["caption"].encode("utf-8")
        writer.write(member)
        sizes[shard_name] += 1
        report.accepted.append({"source": source, "key": key, "shard": shard_name})
    if writer is not None:
        writer.close()
    (out_dir / "sizes.json").write_text(json.dumps(sizes, indent=2))
    result = report.to_dict()
    (out_dir / "build_report.json").write_text(json.dumps(result, indent=2))
    return result
