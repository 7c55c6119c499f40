"""`mmvssl narrate`: pseudo-narrations for every window of every video, as JSON lines and,
optionally, as new shards whose metadata carries them (so they train the dual encoder).

Input is a folder of videos or a shard set. Each output line is
{"source", "key", "start", "end", "candidates": [{"text", "score"}, ...]}. Re-running appends
only the windows not yet written; unreadable videos are reported and skipped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .data.decode import DecodeError, decode_window, probe
from .data.loader import frames_to_tensor, list_shards
from .data.shardio import VIDEO_EXTENSIONS, skip_unreadable_shard
from .data.shards import MEDIA_SUFFIXES
from .errors import MmvsslError
from .narrator.generate import GenerationConfig, generate
from .narrator.model import Narrator
from .narrator.tokenizer import SentencePieceTokenizer


def _videos(source: str) -> Iterator[tuple[str, str, bytes | None, dict, str | None, dict[str, bytes]]]:
    """(source name, key, video bytes or None when unreadable, metadata, error, members) for each input
    video; members are the sample's stored bytes by extension (a video file: its one member), which
    --shards-out writes back unchanged beside the new metadata."""
    path = Path(source)
    if path.is_dir() and not list(path.glob("*.tar")):
        for i, f in enumerate(sorted(p for p in path.rglob("*") if p.suffix.lower() in MEDIA_SUFFIXES)):
            rel = str(f.relative_to(path))
            try:
                data = f.read_bytes()
                yield rel, f"{i:09d}", data, {"source": rel}, None, {f.suffix.lower().lstrip("."): data}
            except OSError as e:
                yield rel, f"{i:09d}", None, {}, f"unreadable ({e.strerror})", {}
        return
    import webdataset as wds
    for sample in wds.WebDataset(list_shards(source), shardshuffle=False, empty_check=False,
                                 handler=skip_unreadable_shard):
        meta = json.loads(sample["json"]) if "json" in sample else {}
        ext = next((e for e in VIDEO_EXTENSIONS if e in sample), None)
        name = meta.get("source", sample["__key__"])
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        yield name, sample["__key__"], sample.get(ext) if ext else None, meta, None if ext else "no video member", members


def _written_rows(out_file: Path) -> dict[str, list[dict]]:
    """Rows already in the output, by key (a line cut by an interruption is simply redone)."""
    rows: dict[str, list[dict]] = {}
    if out_file.is_file():
        for line in out_file.read_text().splitlines():
            try:
                row = json.loads(line)
                rows.setdefault(row["key"], []).append(row)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return rows


def narrate(model_dir: str, source: str, out_file: str, window_seconds: float | None = None,
            stride: float | None = None, shards_out: str | None = None, gen: GenerationConfig = GenerationConfig(),
            batch_size: int = 8, progress: bool = True) -> dict:
    model = Narrator.from_pretrained(model_dir).eval()
    tok_file = Path(model_dir) / model.config.get("tokenizer", "tokenizer.model")
    tokenizer = SentencePieceTokenizer(tok_file)
    sampling = model.config.get("sampling", {"num_frames": 8, "fps": 4.0, "size": 64})
    window = window_seconds or sampling["num_frames"] / sampling["fps"]
    stride = stride or window
    clip_fps = sampling["num_frames"] / window  # the narrator always sees num_frames frames per window
    out_path = Path(out_file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = _written_rows(out_path)
    done = {(k, round(float(r["start"]), 3)) for k, rows in written.items() for r in rows}
    counts = {"videos": 0, "windows": 0, "skipped_done": 0, "failed": []}
    writer = None
    if shards_out:
        import webdataset as wds
        Path(shards_out).mkdir(parents=True, exist_ok=True)
        # encoder=False: every member is written as the bytes it was read as (webdataset's default
        # encoder would gzip a `.gz` member a second time)
        writer = wds.ShardWriter(os.path.join(shards_out, "shard-%06d.tar"), maxcount=256, verbose=0, encoder=False)
    iterator = _videos(source)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="narrate", unit="video", file=sys.stderr)
    with open(out_path, "a") as out:
        for name, key, data, meta, error, members in iterator:
            try:
                if data is None:
                    raise DecodeError(error or "no video")
                duration = float(meta.get("duration") or probe(data).duration)
                starts = np.arange(0.0, max(duration - window, 0.0) + 1e-6, stride).tolist()
                todo = [s for s in starts if (key, round(s, 3)) not in done]
                counts["skipped_done"] += len(starts) - len(todo)
                rows = []
                for i in range(0, len(todo), batch_size):
                    chunk = todo[i:i + batch_size]
                    clips = [decode_window(data, s, sampling["num_frames"], clip_fps, sampling["size"], None)
                             for s in chunk]
                    video = torch.stack([frames_to_tensor(c.frames) for c in clips])
                    for clip, candidates in zip(clips, generate(model, video, gen)):
                        row = {"source": name, "key": key, "start": round(clip.start, 3), "end": round(clip.end, 3),
                               "candidates": [{"text": tokenizer.decode(c["tokens"]), "score": round(c["score"], 4)}
                                              for c in candidates]}
                        out.write(json.dumps(row) + "\n")
                        rows.append(row)
                    out.flush()
                counts["videos"] += 1
                counts["windows"] += len(rows)
                if writer is not None:
                    every = sorted(written.get(key, []) + rows, key=lambda r: r["start"])
                    pseudo = [{"start": r["start"], "end": r["end"], "text": r["candidates"][0]["text"],
                               "score": r["candidates"][0]["score"]} for r in every]
                    writer.write({"__key__": key, **members,  # audio, features, text: all kept
                                  "json": json.dumps({**meta, "pseudo_narrations": pseudo}).encode("utf-8")})
            except DecodeError as e:
                counts["failed"].append({"source": name, "reason": str(e)})
                print(f"narrate: skipped {name}: {e}", file=sys.stderr)
    if writer is not None:
        writer.close()
    if counts["videos"] == 0 and not counts["failed"]:
        raise MmvsslError(f"no videos found in {source}")
    return counts
