"""`mmvssl rephrase`: K paraphrases of every human narration of a shard set, written into new
shards (LaViLa's rephraser, a T5 paraphraser from transformers loaded from a local folder).

Each output sample is the input sample with every member's bytes copied unchanged, except its
`.json`, which gains `paraphrases`: [{start, end, text, of}] where `of` is the index of the
narration in `narrations` (start and end are that narration's). Shards are read member by
member as bytes (never unpickled); narrations of several samples are paraphrased together in
batches, and a text seen before is not paraphrased again.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MmvsslError


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
    """Samples waiting for their narrations' paraphrases; flushed once enough texts are queued."""

    def __init__(self, model, tokenizer, cfg: RephraseConfig, writer, counts: dict):
        self.model, self.tokenizer, self.cfg, self.writer, self.counts = model, tokenizer, cfg, writer, counts
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
            self.counts["generated"] += len(self.queued) * self.cfg.k
            self.queued = []
        for sample, meta in self.samples:
            paraphrases = []
            for index, n in _human_narrations(meta):
                for text in self.cache[str(n["text"]).strip()]:
                    if not text:
                        self.counts["empty"] += 1  # an empty generation is no paraphrase
                        continue
                    paraphrases.append({"start": n["start"], "end": n["end"], "text": text, "of": index})
            self.counts["narrations"] += len(_human_narrations(meta))
            self.counts["paraphrases"] += len(paraphrases)
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            members["json"] = json.dumps({**meta, "paraphrases": paraphrases}).encode("utf-8")
            self.writer.write({"__key__": sample["__key__"], **members})
            self.counts["samples"] += 1
        self.samples = []


def rephrase_shards(t5_dir: str, shards: str, out_dir: str, cfg: RephraseConfig = RephraseConfig(),
                    samples_per_shard: int = 256, progress: bool = True) -> dict:
    """Write shards to `out_dir` whose samples carry `paraphrases`; returns counts
    {samples, narrations, paraphrases, generated, empty}."""
    import webdataset as wds
    from ..data.loader import list_shards
    from ..data.shardio import skip_unreadable_shard
    urls = list_shards(shards)
    out = Path(out_dir)
    if out.resolve() in {Path(u).resolve().parent for u in urls}:
        raise MmvsslError(f"--out {out} is the input shard folder: write the rephrased shards elsewhere")
    model, tokenizer = load_paraphraser(t5_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"samples": 0, "narrations": 0, "paraphrases": 0, "generated": 0, "empty": 0}
    samples = wds.WebDataset(urls, shardshuffle=False, empty_check=False,  # member bytes, nothing decoded
                             handler=skip_unreadable_shard)
    if progress:
        from tqdm import tqdm
        samples = tqdm(samples, desc="rephrase", unit="sample", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        # encoder=False: members are written as the bytes they were read as (the default encoder
        # would gzip a `.gz` member a second time)
        with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0,
                             encoder=False) as writer:
            pending = _PendingSamples(model, tokenizer, cfg, writer, counts)
            for sample in samples:
                try:
                    meta = json.loads(sample["json"]) if "json" in sample else {}
                except json.JSONDecodeError as e:
                    raise MmvsslError(f"{sample.get('__url__', shards)}: sample {sample['__key__']}: "
                                      f"metadata is not JSON ({e})") from None
                if not isinstance(meta, dict):
                    raise MmvsslError(f"{sample.get('__url__', shards)}: sample {sample['__key__']}: "
                                      f"metadata is not a JSON object")
                pending.add(sample, meta)
            pending.flush()
    if counts["samples"] == 0:
        raise MmvsslError(f"no samples found in {shards}")
    return counts
