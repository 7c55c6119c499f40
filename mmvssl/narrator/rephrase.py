"""`mmvssl rephrase`: K paraphrases of every human narration of a shard set, written into new
shards (LaViLa's rephraser, a T5 paraphraser from transformers loaded from a local folder).

Each output sample is the input sample with every member's bytes copied unchanged, except its
`.json`, which gains `paraphrases`: [{start, end, text, of}] where `of` is the index of the
narration in `narrations` (start and end are that narration's). The shards are written by the
shard rewriter (mmvssl/data/rewrite.py: read member by member, never unpickled, each output
shard atomic, `rephrase_report.json`, a re-run resumes); narrations of several samples are
paraphrased together in batches, and a text seen before in the same output shard is not
paraphrased again. The generator is seeded per output shard, so a resumed run writes what an
uninterrupted one would. A sample whose metadata is not a JSON object is reported and skipped.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.decode import DecodeError
from ..data.rawsample import metadata
from ..data.rewrite import OutputShard, ShardRewriter, shard_parts
from ..errors import MmvsslError

REPORT = "rephrase_report.json"


@dataclass
class RephraseConfig:
    k: int = 3  # paraphrases per narration
    strategy: str = "sample"  # sample (nucleus) | beam (the k best beams)
    top_p: float = 0.95
    temperature: float = 0.7
    num_beams: int = 5  # beam: raised to k when smaller
    max_length: int = 64  # new tokens per paraphrase
    batch_size: int = 16  # narrations per generate call
    prompt: str = "paraphrase: "
    seed: int = 0


def load_paraphraser(folder: str | os.PathLike):
    """(T5ForConditionalGeneration, tokenizer) from a local folder; nothing is downloaded."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise MmvsslError(f"T5 paraphraser folder {path} has no config.json (expected a folder written by "
                          f"save_pretrained, with the model and its tokenizer)")
    try:
        model = T5ForConditionalGeneration.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise MmvsslError(f"cannot load the T5 paraphraser from {path}: {e}") from None
    return model.eval(), tokenizer


@torch.no_grad()
def paraphrase(model, tokenizer, texts: list[str], cfg: RephraseConfig = RephraseConfig()) -> list[list[str]]:
    """cfg.k paraphrases of each text (batched); returns one list of k strings per text."""
    if cfg.strategy not in ("sample", "beam"):
        raise MmvsslError(f"rephrase strategy must be 'sample' or 'beam', got '{cfg.strategy}'")
    if cfg.k < 1:
        raise MmvsslError(f"rephrase k must be at least 1, got {cfg.k}")
    device = next(model.parameters()).device
    out: list[list[str]] = []
    for i in range(0, len(texts), cfg.batch_size):
        chunk = [cfg.prompt + t for t in texts[i:i + cfg.batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True).to(device)
        if cfg.strategy == "sample":
            options = {"do_sample": True, "top_p": cfg.top_p, "temperature": cfg.temperature}
        else:
            options = {"do_sample": False, "num_beams": max(cfg.num_beams, cfg.k)}
        ids = model.generate(**enc, num_return_sequences=cfg.k, max_new_tokens=cfg.max_length, **options)
        decoded = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]  # (len(chunk) * k)
        out += [decoded[j * cfg.k:(j + 1) * cfg.k] for j in range(len(chunk))]
    return out


def _human_narrations(meta: dict) -> list[tuple[int, dict]]:
    """(index in `narrations`, narration) of every narration with a text and a time span."""
    return [(i, n) for i, n in enumerate(meta.get("narrations") or [])
            if isinstance(n, dict) and str(n.get("text", "")).strip() and "start" in n and "end" in n]


class _PendingSamples:
    """Samples of one output shard waiting for their narrations' paraphrases; flushed once enough
    texts are queued."""

    def __init__(self, model, tokenizer, cfg: RephraseConfig, shard: OutputShard):
        self.model, self.tokenizer, self.cfg, self.shard = model, tokenizer, cfg, shard
        self.samples: list[tuple[dict, dict]] = []
        self.cache: dict[str, list[str]] = {}
        self.queued: list[str] = []

    def add(self, sample: dict, meta: dict) -> None:
        self.samples.append((sample, meta))
        for _, n in _human_narrations(meta):
            text = str(n["text"]).strip()
            if text not in self.cache and text not in self.queued:
                self.queued.append(text)
        if len(self.queued) >= self.cfg.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.queued:
            self.cache.update(zip(self.queued, paraphrase(self.model, self.tokenizer, self.queued, self.cfg)))
            self.shard.count("generated", len(self.queued) * self.cfg.k)
            self.queued = []
        for sample, meta in self.samples:
            paraphrases = []
            for index, n in _human_narrations(meta):
                for text in self.cache[str(n["text"]).strip()]:
                    if not text:
                        self.shard.count("empty")  # an empty generation is no paraphrase
                        continue
                    paraphrases.append({"start": n["start"], "end": n["end"], "text": text, "of": index})
            self.shard.count("narrations", len(_human_narrations(meta)))
            self.shard.count("paraphrases", len(paraphrases))
            self.shard.write(sample, {"json": json.dumps({**meta, "paraphrases": paraphrases}).encode("utf-8")})
        self.samples = []


def rephrase_shards(t5_dir: str, shards: str, out_dir: str, cfg: RephraseConfig = RephraseConfig(),
                    samples_per_shard: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Write shards to `out_dir` whose samples carry `paraphrases` (one output shard per input shard
    of the same name, or `shard-%06d.tar` of `samples_per_shard` samples); returns counts
    {samples, narrations, paraphrases, generated, empty, skipped} over the whole folder, and
    `done_before`, the shards an earlier run had finished."""
    from ..data.loader import list_shards
    urls = list_shards(shards)
    if Path(out_dir).resolve() in {Path(u).resolve().parent for u in urls}:
        raise MmvsslError(f"--out {out_dir} is the input shard folder: write the rephrased shards elsewhere")
    model, tokenizer = load_paraphraser(t5_dir)
    header = {"paraphraser": str(Path(t5_dir).resolve()),
              "settings": {**asdict(cfg), "samples_per_shard": samples_per_shard}}
    rewriter = ShardRewriter(out_dir, REPORT, header, inputs=urls, overwrite=overwrite, command="rephrase",
                             counts=("narrations", "paraphrases", "generated", "empty"))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="rephrase", unit="sample", file=sys.stderr, disable=not rewriter.share.is_main)
    with torch.random.fork_rng(devices=[]):
        for context in rewriter.pending(shard_parts(urls, samples_per_shard)):
            with context as shard:
                torch.manual_seed(zlib.crc32(f"{cfg.seed}/{shard.part.name}".encode()))  # resumes exactly
                pending = _PendingSamples(model, tokenizer, cfg, shard)
                for sample in shard.part.samples():
                    if bar is not None:
                        bar.update(1)
                    try:
                        meta = metadata(sample)
                    except DecodeError as e:
                        shard.skip(sample, str(e))
                        print(f"rephrase: skipped {shard.part.name} {sample['__key__']}: {e}", file=sys.stderr)
                        continue
                    pending.add(sample, meta)
                pending.flush()
    if bar is not None:
        bar.close()
    rewriter.finish()  # every process's shards, merged by rank 0
    counts = rewriter.totals("narrations", "paraphrases", "generated", "empty")
    if counts["samples"] == 0 and counts["skipped"] == 0:
        raise MmvsslError(f"no samples found in {shards}")
    return {**counts, "done_before": rewriter.done_before}
