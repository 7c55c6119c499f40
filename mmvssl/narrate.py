"""`mmvssl narrate`: pseudo-narrations for every window of every video, as JSON lines and,
optionally, as new shards whose metadata carries them (so they train the dual encoder).

Input is a folder of videos or a shard set. Each output line is
{"source", "key", "start", "end", "candidates": [{"text", "score"}, ...]}. Re-running appends
only the windows not yet written; unreadable videos are reported and skipped. `--shards-out`
goes through the shard rewriter (mmvssl/data/rewrite.py): one output shard per input shard of
the same name (a folder of videos: `shard-%06d.tar` of 256 videos), every member copied byte for
byte beside the new metadata, each shard atomic, `narrate_report.json`, finished shards kept by
a re-run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch

from .data.decode import DecodeError, decode_window, probe
from .data.loader import frames_to_tensor, list_shards
from .data.rawsample import metadata, video_bytes
from .data.rewrite import Part, ShardRewriter, chunked_parts, shard_parts
from .data.sampling import sliding_windows
from .data.shardio import skip_unreadable_shard
from .data.shards import MEDIA_SUFFIXES
from .errors import MmvsslError
from .narrator.generate import GenerationConfig, generate
from .narrator.model import Narrator
from .narrator.tokenizer import SentencePieceTokenizer

REPORT = "narrate_report.json"
VIDEOS_PER_SHARD = 256  # --shards-out from a folder of videos


def _folder_samples(path: Path) -> Iterator[dict]:
    """Each video file of a folder as a raw sample ({__key__, <ext>: bytes, json: {source}}); an
    unreadable file carries its reason in `__error__`."""
    for i, f in enumerate(sorted(p for p in path.rglob("*") if p.suffix.lower() in MEDIA_SUFFIXES)):
        rel = str(f.relative_to(path))
        raw = {"__key__": f"{i:09d}", "json": json.dumps({"source": rel}).encode("utf-8")}
        try:
            raw[f.suffix.lower().lstrip(".")] = f.read_bytes()
        except OSError as e:
            raw["__error__"] = f"unreadable ({e.strerror})"
        yield raw


def _read_shard_leniently(url: str) -> Iterator[dict]:
    """A shard's raw samples; an unreadable shard is reported on one line and passed over."""
    import webdataset as wds
    yield from wds.WebDataset([url], shardshuffle=False, empty_check=False, handler=skip_unreadable_shard)


def _parts(source: str) -> Iterator[Part]:
    path = Path(source)
    if path.is_dir() and not list(path.glob("*.tar")):
        return chunked_parts(_folder_samples(path), VIDEOS_PER_SHARD, str(path.resolve()))
    return shard_parts(list_shards(source), reader=_read_shard_leniently)


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

    def narrate_one(raw: dict, out) -> list[dict]:
        """The rows of one video (written to `out` as they come); DecodeError when it is unusable."""
        meta = metadata(raw)
        if "__error__" in raw:
            raise DecodeError(raw["__error__"])
        key, data = raw["__key__"], video_bytes(raw)
        duration = float(meta.get("duration") or probe(data).duration)
        starts = sliding_windows(duration, window, stride)
        todo = [s for s in starts if (key, round(s, 3)) not in done]
        counts["skipped_done"] += len(starts) - len(todo)
        rows = []
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            clips = [decode_window(data, s, sampling["num_frames"], clip_fps, sampling["size"], None) for s in chunk]
            video = torch.stack([frames_to_tensor(c.frames) for c in clips])
            for clip, candidates in zip(clips, generate(model, video, gen)):
                row = {"source": meta.get("source", key), "key": key, "start": round(clip.start, 3),
                       "end": round(clip.end, 3),
                       "candidates": [{"text": tokenizer.decode(c["tokens"]), "score": round(c["score"], 4)}
                                      for c in candidates]}
                out.write(json.dumps(row) + "\n")
                rows.append(row)
            out.flush()
        return rows

    def name_of(raw: dict) -> str:
        try:
            return str(metadata(raw).get("source", raw["__key__"]))
        except DecodeError:
            return str(raw["__key__"])

    rewriter = None
    if shards_out:
        settings = {"window": window, "stride": stride, "generation": asdict(gen)}
        rewriter = ShardRewriter(shards_out, REPORT, {"narrator": str(Path(model_dir).resolve()),
                                                      "settings": json.loads(json.dumps(settings))},
                                 command="narrate --shards-out")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="narrate", unit="video", file=sys.stderr)
    parts = _parts(source)
    with open(out_path, "a") as out:
        for context in (rewriter.pending(parts) if rewriter else _unwritten(parts)):
            with context as shard:
                for raw in shard.part.samples():
                    if bar is not None:
                        bar.update(1)
                    try:
                        rows = narrate_one(raw, out)
                    except DecodeError as e:
                        counts["failed"].append({"source": name_of(raw), "reason": str(e)})
                        print(f"narrate: skipped {name_of(raw)}: {e}", file=sys.stderr)
                        if rewriter is not None:
                            shard.skip(raw, str(e))
                        continue
                    counts["videos"] += 1
                    counts["windows"] += len(rows)
                    if rewriter is not None:
                        every = sorted(written.get(raw["__key__"], []) + rows, key=lambda r: r["start"])
                        pseudo = [{"start": r["start"], "end": r["end"], "text": r["candidates"][0]["text"],
                                   "score": r["candidates"][0]["score"]} for r in every]
                        meta = {**metadata(raw), "pseudo_narrations": pseudo}
                        shard.write(raw, {"json": json.dumps(meta).encode("utf-8")})  # every other member kept
    if bar is not None:
        bar.close()
    if counts["videos"] == 0 and not counts["failed"] and not (rewriter and rewriter.done_before):
        raise MmvsslError(f"no videos found in {source}")
    return counts


class _ReadOnly:
    """A part read without writing a shard (narrate without --shards-out)."""

    def __init__(self, part: Part):
        self.part = part

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def _unwritten(parts) -> Iterator[_ReadOnly]:
    return (_ReadOnly(p) for p in parts)
