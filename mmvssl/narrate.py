"""`mmvssl narrate`: pseudo-narrations for every window of every video, as JSON lines and,
optionally, as new shards whose metadata carries them (so they train the dual encoder).

Input is a folder of videos or a shard set. Each output line is
{"source", "key", "start", "end", "candidates": [{"text", "score"}, ...], "provenance": ID}: every
candidate the narrator gave the window, best first (`--num-candidates`, by default LaViLa's 10
sampled with top_p 0.95 and temperature 0.7: facebookresearch/LaViLa main_infer_narrator.py), and
the id of what made them (narration_provenance: the narrator's and tokenizer's fingerprints, the
seed, the sampling settings, the windows), spelt out in `<out>.provenance.json`. Each window
samples from its own generator, seeded by the run's seed, the sample key and the window start, so
its draws do not depend on the windows sampled before it (a resumed run, another --batch-size; up
to the floating-point differences batched arithmetic may make in the probabilities). Re-running
appends only the windows not yet written with the same provenance; unreadable videos are reported
and skipped. `--shards-out` goes through the shard rewriter (mmvssl/data/rewrite.py): one output
shard per input shard of the same name (a folder of videos: `shard-%06d.tar` of 256 videos), every
member copied byte for byte beside the new metadata, each shard atomic, `narrate_report.json`,
finished shards kept by a re-run. The new metadata: `pseudo_narrations` [{start, end, text, score,
candidates: [{text, score}, ...]}] (text and score: the best candidate) and
`pseudo_narrations_provenance` (the provenance itself); the dual encoder draws one candidate per
clip (mmvssl.data.sampling.source_texts), as LaViLa draws one of a clip's narrations.

Under torchrun (mmvssl/data/workshare.py) the input's shards are dealt out over the processes
(with `--shards-out`, as the rewriter deals its unfinished parts; else shard i to rank i % world).
Each process appends its lines to its own file, `.<out name>.parts/rank-NNNNN.jsonl` beside
`--out`; after every process is done, rank 0 appends their complete lines to `--out` (lines it
already holds are not added twice) and removes them, so `--out` holds the lines one process
writes, in another order. A killed run's rank files are read back by the next run (with any
number of processes) as windows done, and merged at its end.
"""

from __future__ import annotations

import hashlib
import json
import os
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
from .data.shardio import MemberLimits, skip_unreadable_shard, tar_samples
from .data.shards import MEDIA_SUFFIXES
from .data.workshare import Share
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


def _read_shard_leniently(url: str, limits: MemberLimits | None = None) -> Iterator[dict]:
    """A shard's raw samples; an unreadable shard is reported on one line and passed over. A member
    over the size limit is refused from its tar header (one line) and its sample skipped with that
    reason (shardio.tar_samples)."""
    yield from tar_samples([{"url": url}], skip_unreadable_shard, limits)


def _parts(source: str, limits: MemberLimits | None = None) -> Iterator[Part]:
    path = Path(source)
    if path.is_dir() and not list(path.glob("*.tar")):
        return chunked_parts(_folder_samples(path), VIDEOS_PER_SHARD, str(path.resolve()))
    return shard_parts(list_shards(source), reader=lambda url: _read_shard_leniently(url, limits))


def _written_rows(*files: Path) -> dict[str, list[dict]]:
    """Rows already in the output (and in the processes' files of an unfinished run), by key (a
    line cut by an interruption is simply redone)."""
    rows: dict[str, list[dict]] = {}
    for path in files:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                rows.setdefault(row["key"], []).append(row)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return rows


def _rank_files(out_path: Path) -> tuple[Path, list[Path]]:
    """(the folder of the processes' line files, the files in it now)."""
    folder = out_path.with_name(f".{out_path.name}.parts")
    return folder, sorted(folder.glob("rank-*.jsonl"))


def _open_for_append(path: Path):
    """`path` opened to append lines; a last line cut by an interruption is dropped first, so the
    next line does not join it."""
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            os.truncate(path, data.rfind(b"\n") + 1)
    return open(path, "a")


def _merge_rank_files(out_path: Path) -> None:
    """Rank 0, after every process finished: the complete lines of the processes' files appended to
    `out_path` (durably; a line it holds already, from a merge interrupted before the files were
    removed, is not added again), then the files removed."""
    folder, files = _rank_files(out_path)
    if not files:
        return
    have = set(out_path.read_text().splitlines()) if out_path.is_file() else set()
    with _open_for_append(out_path) as out:
        for path in files:
            for line in path.read_text().splitlines(keepends=True):
                if line.endswith("\n") and line[:-1] not in have:
                    out.write(line)
                    have.add(line[:-1])
        out.flush()
        os.fsync(out.fileno())
    for path in files:
        path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def narration_provenance(model: Narrator, tokenizer_file: Path, gen: GenerationConfig, window: float,
                         stride: float) -> dict:
    """What made a run's narrations: the narrator's fingerprint (its config and every weight), its
    tokenizer's (sha256 of the file), the run's seed (each window's generator: window_seed) and
    sampling settings, and the windows. Stored with the narrations so that they can be told apart
    and remade."""
    from .evaluation.features import model_fingerprint
    return {"narrator": model_fingerprint(model),
            "tokenizer": hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest()[:16],
            "seed": gen.seed,
            "sampling": {"strategy": gen.strategy, "num_candidates": gen.num_candidates, "top_p": gen.top_p,
                         "temperature": gen.temperature, "max_length": gen.max_length, "num_beams": gen.num_beams},
            "window": window, "stride": stride}


def provenance_id(provenance: dict) -> str:
    """A short id of a provenance (sha256 of its canonical JSON), written on every output line."""
    return hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]


def window_seed(seed: int, key: str, start: float) -> int:
    """The seed of one window's sampling generator: a hash of (run seed, sample key, window start)."""
    digest = hashlib.blake2b(f"narrate/{seed}/{key}/{start:.3f}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def _record_provenance(out_path: Path, pid: str, provenance: dict) -> None:
    """Add this run's provenance to `<out>.provenance.json` ({id: provenance}), atomically."""
    from .fsio import atomic_write_json
    path = out_path.with_suffix(".provenance.json")
    known = {}
    if path.is_file():
        try:
            known = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
    if not isinstance(known, dict):
        known = {}
    if known.get(pid) != provenance:
        atomic_write_json(path, {**known, pid: provenance})


def narrate(model_dir: str, source: str, out_file: str, window_seconds: float | None = None,
            stride: float | None = None, shards_out: str | None = None, gen: GenerationConfig = GenerationConfig(),
            batch_size: int = 8, progress: bool = True, limits: MemberLimits | None = None) -> dict:
    """Narrate every window of `source` (a folder of videos or shards) into `out_file`; shard members
    over `limits` (--max-member-mb) are refused from their tar header and their videos skipped.
    Under torchrun every process narrates its share; the counts returned are over all processes."""
    if gen.num_candidates < 1 or gen.num_beams < 1:
        raise MmvsslError(f"narrate: --num-candidates and --num-beams must be at least 1, got "
                          f"{gen.num_candidates} and {gen.num_beams}")
    model = Narrator.from_pretrained(model_dir).eval()
    tok_file = Path(model_dir) / model.config.get("tokenizer", "tokenizer.model")
    tokenizer = SentencePieceTokenizer(tok_file)
    sampling = model.config.get("sampling", {"num_frames": 8, "fps": 4.0, "size": 64})
    window = window_seconds or sampling["num_frames"] / sampling["fps"]
    stride = stride or window
    clip_fps = sampling["num_frames"] / window  # the narrator always sees num_frames frames per window
    out_path = Path(out_file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    provenance = narration_provenance(model, tok_file, gen, window, stride)
    pid = provenance_id(provenance)
    share = Share.from_env()
    if share.is_main:
        _record_provenance(out_path, pid, provenance)
    rank_folder, rank_files = _rank_files(out_path)
    written = {k: [r for r in rows if r.get("provenance") == pid]  # rows made otherwise are redone
               for k, rows in _written_rows(out_path, *rank_files).items()}
    share.barrier()  # every process has read what is done before any writes
    done = {(k, round(float(r["start"]), 3)) for k, rows in written.items() for r in rows}
    counts = {"videos": 0, "windows": 0, "skipped_done": 0, "failed": [], "provenance": provenance}

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
            seeds = None if gen.seed is None else [window_seed(gen.seed, key, s) for s in chunk]
            for clip, candidates in zip(clips, generate(model, video, gen, seeds)):
                row = {"source": meta.get("source", key), "key": key, "start": round(clip.start, 3),
                       "end": round(clip.end, 3),
                       "candidates": [{"text": tokenizer.decode(c["tokens"]), "score": round(c["score"], 4)}
                                      for c in candidates], "provenance": pid}
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
                                                      "settings": json.loads(json.dumps(settings)),
                                                      "provenance": provenance},
                                 command="narrate --shards-out", share=share)
    bar = None
    if progress and share.is_main:
        from tqdm import tqdm
        bar = tqdm(desc="narrate", unit="video", file=sys.stderr)
    parts = _parts(source, limits)
    if share.world > 1:  # this process's lines: its own file, merged into out_path at the end
        rank_folder.mkdir(exist_ok=True)
        lines_path = rank_folder / f"rank-{share.rank:05d}.jsonl"
    else:
        lines_path = out_path
    with _open_for_append(lines_path) as out:
        for context in (rewriter.pending(parts) if rewriter else _unwritten(parts, share)):
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
                        # every candidate of every window (LaViLa trains on several per clip), the best as text
                        pseudo = [{"start": r["start"], "end": r["end"], "text": r["candidates"][0]["text"],
                                   "score": r["candidates"][0]["score"], "candidates": r["candidates"]}
                                  for r in every]
                        meta = {**metadata(raw), "pseudo_narrations": pseudo,
                                "pseudo_narrations_provenance": provenance}
                        shard.write(raw, {"json": json.dumps(meta).encode("utf-8")})  # every other member kept
    if bar is not None:
        bar.close()
    if rewriter is not None:
        rewriter.finish()  # every process's shards in narrate_report.json
    every = share.gather_objects({k: counts[k] for k in ("videos", "windows", "skipped_done", "failed")})
    counts.update({k: sum(c[k] for c in every) for k in ("videos", "windows", "skipped_done")},
                  failed=[f for c in every for f in c["failed"]])
    if share.is_main:  # the gather above waited for every process: their lines are in their files
        _merge_rank_files(out_path)  # also those of a killed earlier run
    share.barrier()  # no process returns before out_path holds every line
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


def _unwritten(parts, share: Share) -> Iterator[_ReadOnly]:
    """Without --shards-out: part i is rank i % world's (the others' shards are not read)."""
    return (_ReadOnly(p) for i, p in enumerate(parts) if share.owns(i))
