"""Narrator generation speed (a script, not a test): tokens/s with the caches against re-running the
prefix at every token (LaViLa's way), and `mmvssl narrate` end to end with 2 processes against 1.

    .venv/bin/python eval/bench/narrate.py [--lm small] [--tokens 76] [--clips 8] [--candidates 10]
        [--threads N] [--videos 8] [--out docs/benchmarks/narrate.md]

Tokens/s: the narrator is built from config with random weights and open gates (speed does not
depend on the weights) and an end token that is never sampled, so every path runs exactly
`--tokens` steps (76: LaViLa's max_length 77, the start token included) on the same batch, the one
`mmvssl narrate` generates: `--clips` windows x `--candidates` nucleus-sampled candidates (8 x 10,
narrate's --batch-size and --num-candidates), each window with its own seeded generator as narrate
seeds them. Three paths, alternating within each repeat (the best of each kept, so that other load on
a shared machine hits them alike):
  - cache: mmvssl's generation, GPT-2's key/value cache and each gated cross-attention layer's
    keys and values of the visual context projected once per clip (Narrator.visual_kv);
  - GPT-2 cache only: the same, but the cross-attention projects the visual context again at every
    token for every candidate (mmvssl's generation before the cross-attention cache);
  - re-run the prefix: the whole growing sequence through the whole model at every token, cross
    attention included, the context repeated per candidate (facebookresearch/LaViLa
    lavila/models/narrator.py, VCLM_HF.generate). Target: the cache >= 5x this.

Narrate: demo videos (`mmvssl data synth`, 16 s each: 8 windows of 2 s, one batch of 8 windows x 10
candidates per video) built into shards of 2 videos (`mmvssl shards build`), narrated by
`python -m mmvssl.cli narrate` with narrate's defaults (10 candidates, max_length 77, top_p 0.95,
temperature 0.7) by a saved GPT-2 `--lm` narrator with a sentencepiece tokenizer: once as one process
with every core's threads (OMP_NUM_THREADS = cores), once as one process with half of them, once
under `torchrun --nproc_per_node 2` with half each (narrate deals the shards over the processes and
merges their lines into --out). Windows/s: the windows written over each command's wall time (process
start, model load and video decode included). The 2-process lines are compared with the 1-process
lines of the same thread count, sorted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def build(lm: str, vocab: int = 1000):
    """A narrator of GPT-2 size `lm` with gated cross-attention in every block, random weights, open gates."""
    from transformers import GPT2Config

    from mmvssl.models.presets import load_preset
    from mmvssl.narrator.build import LM_SIZES
    from mmvssl.narrator.model import Narrator
    cfg = GPT2Config(vocab_size=vocab, n_positions=128, bos_token_id=2, eos_token_id=3, **LM_SIZES[lm]).to_dict()
    model = Narrator({"video": load_preset("vatt-tiny")["video"], "lm": cfg, "num_queries": 32, "cross_every": 1,
                      "pad_id": 0, "bos_id": 2, "eos_id": vocab + 10,  # an id never sampled: no early end
                      "sampling": {"num_frames": 8, "fps": 4.0, "size": 64}}).eval()
    for block in model.gated_blocks:
        torch.nn.init.constant_(block.gated.attn_gate, 0.5)
        torch.nn.init.constant_(block.gated.ffn_gate, 0.5)
    return model


PATHS = {"cache": "KV cache + cross-attention K/V cache (mmvssl)",
         "gpt2_cache_only": "GPT-2 KV cache only (cross-attention K/V projected every token)",
         "rerun": "re-run the prefix every token (LaViLa)"}


def generation_rates(model, video: torch.Tensor, tokens: int, candidates: int, repeats: int) -> dict:
    """Tokens/s of each path in PATHS (the best of `repeats` alternating rounds) and the tokens of
    each path's first run (the same work: every path makes clips x candidates x tokens)."""
    from mmvssl.narrator.generate import GenerationConfig, generate
    seeds = list(range(video.shape[0]))  # one generator per window, as narrate

    def run(path: str):
        cfg = GenerationConfig(num_candidates=candidates, max_length=tokens + 1, use_cache=path != "rerun")
        if path == "gpt2_cache_only":  # the context itself, repeated per candidate: projected at every token
            model.visual_kv = lambda visual: visual.repeat_interleave(candidates, dim=0)
        try:
            start = time.perf_counter()
            out = generate(model, video, cfg, seeds)
            return time.perf_counter() - start, out
        finally:
            model.__dict__.pop("visual_kv", None)

    with torch.no_grad():
        for path in PATHS:  # warm-up
            generate(model, video[:1], GenerationConfig(num_candidates=2, max_length=4, use_cache=path != "rerun"))
        best = {path: float("inf") for path in PATHS}
        lengths = {}
        for _ in range(repeats):
            for path in PATHS:
                seconds, out = run(path)
                best[path] = min(best[path], seconds)
                lengths[path] = sorted({len(c["tokens"]) - 1 for clip in out for c in clip})
    for path, made in lengths.items():  # forced length: no path may stop early
        assert made == [tokens], f"{path}: generated {made} tokens, expected {tokens}"
    work = video.shape[0] * candidates * tokens
    rates = {path: work / seconds for path, seconds in best.items()}
    return {"tokens_per_s": rates, "seconds": best, "speedup": rates["cache"] / rates["rerun"],
            "speedup_gpt2_cache_only": rates["gpt2_cache_only"] / rates["rerun"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_narrate_inputs(tmp: Path, lm: str, videos: int, per_shard: int) -> tuple[Path, Path]:
    """(a saved narrator folder, a folder of shards of demo videos 16 s long)."""
    from mmvssl.data.shards import build_shards
    from mmvssl.data.synth import make_synthetic_dataset
    from mmvssl.narrator.tokenizer import SentencePieceTokenizer, train_sentencepiece
    make_synthetic_dataset(tmp / "data", seed=0, num_train=videos, num_val=0, seconds=16.0)
    build_shards(tmp / "data" / "train", tmp / "shards", captions=tmp / "data" / "train" / "captions.jsonl",
                 samples_per_shard=per_shard)
    tok_file = train_sentencepiece([f"a red circle number {i} moves" for i in range(200)], tmp / "t.model", 100)
    tok = SentencePieceTokenizer(tok_file)
    torch.manual_seed(0)
    model = build(lm, tok.vocab_size)
    model.config.update(pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)  # saved: the end token is real here
    model.save_pretrained(tmp / "narrator", tokenizer_file=tok_file)
    return tmp / "narrator", tmp / "shards"


def timed_narrate(launcher: list[str], narrator: Path, shards: Path, out: Path, threads: int) -> dict:
    """Run `LAUNCHER mmvssl.cli narrate` with OMP_NUM_THREADS=threads per process; windows written and
    wall-clock seconds."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    command = [*launcher, "-m", "mmvssl.cli", "narrate", str(narrator), "--input", str(shards), "--out", str(out),
               "--batch-size", "8", "--num-candidates", "10", "--max-length", "77"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    windows = len(out.read_text().splitlines())
    return {"windows": windows, "seconds": seconds, "windows_per_s": windows / seconds, "threads_per_process": threads}


def narrate_processes(lm: str, videos: int, per_shard: int, cores: int) -> dict:
    """Windows/s of `mmvssl narrate` as 1 process (all cores' threads, half of them) and as 2 processes."""
    half = max(1, cores // 2)
    python = [sys.executable]
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        narrator, shards = make_narrate_inputs(tmp, lm, videos, per_shard)
        one_all = timed_narrate(python, narrator, shards, tmp / "one_all.jsonl", cores)
        one_half = timed_narrate(python, narrator, shards, tmp / "one_half.jsonl", half)
        two = timed_narrate(torchrun, narrator, shards, tmp / "two.jsonl", half)
        same = sorted((tmp / "two.jsonl").read_text().splitlines()) == sorted(
            (tmp / "one_half.jsonl").read_text().splitlines())
    return {"videos": videos, "shards": -(-videos // per_shard), "cores": cores,
            "one_process_all_threads": one_all, "one_process_half_threads": one_half, "two_processes": two,
            "ratio_vs_one_process_all_threads": two["windows_per_s"] / one_all["windows_per_s"],
            "ratio_vs_one_process_half_threads": two["windows_per_s"] / one_half["windows_per_s"],
            "two_process_lines_equal_one_process_lines": same}


def markdown(r: dict, command: str) -> str:
    g, n = r["generation"], r.get("narrate")
    rows = "\n".join(f"| {PATHS[p]} | {g['tokens_per_s'][p]:.0f} | {g['seconds'][p]:.2f} | "
                     f"{g['tokens_per_s'][p] / g['tokens_per_s']['rerun']:.1f}x |" for p in PATHS)
    head = (
        "# Narrator generation benchmark\n\n"
        f"`{command}` on {r['machine']}, CPU only, {r['threads']} torch thread(s) for the tokens/s part. "
        f"GPT-2 '{r['lm']}' with gated cross-attention before every block, {r['clips']} windows x "
        f"{r['candidates']} nucleus-sampled candidates (the batch `mmvssl narrate` generates), {r['tokens']} tokens "
        f"each (max_length {r['tokens'] + 1}), forced: the end token is never sampled, so every path does the "
        f"same work. Best of {r['repeats']} alternating rounds.\n\n"
        "| path | tokens/s | seconds | vs re-run |\n|---|---|---|---|\n" + rows + "\n\n"
        f"Speed-up of the cache over re-running the prefix: **{g['speedup']:.1f}x** (target >= 5x).\n")
    if n is None:
        return head
    runs = [("1 process", n["one_process_all_threads"]), ("1 process", n["one_process_half_threads"]),
            ("2 processes (torchrun)", n["two_processes"])]
    nrows = "\n".join(f"| {name}, OMP_NUM_THREADS={x['threads_per_process']} | {x['windows']} | {x['seconds']:.1f} | "
                      f"{x['windows_per_s']:.2f} |" for name, x in runs)
    return head + (
        "\n"
        f"`mmvssl narrate` end to end ({n['videos']} demo videos of 16 s in {n['shards']} shards, 8 windows of 2 s "
        f"per video, 10 candidates of up to 76 tokens, max_length 77; {n['cores']} cores):\n\n"
        "| run | windows | seconds | windows/s |\n|---|---|---|---|\n" + nrows + "\n\n"
        f"2 processes against 1 with every core's threads: **{n['ratio_vs_one_process_all_threads']:.2f}x**; "
        f"against 1 with the same threads per process: **{n['ratio_vs_one_process_half_threads']:.2f}x**. "
        f"The 2-process lines equal the 1-process lines (sorted): "
        f"{'yes' if n['two_process_lines_equal_one_process_lines'] else 'no'}.\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm", default="small", choices=["tiny", "small", "gpt2"])
    p.add_argument("--tokens", type=int, default=76, help="generated tokens (max_length - 1)")
    p.add_argument("--clips", type=int, default=8, help="windows in the batch (narrate's --batch-size)")
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds of the three paths; best kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the tokens/s part (default: torch's)")
    p.add_argument("--videos", type=int, default=8, help="demo videos for narrate end to end (0: skip)")
    p.add_argument("--videos-per-shard", type=int, default=2)
    p.add_argument("--out", default=None, help="write the markdown report here (and the JSON beside it)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.lm)
    video = torch.randn(args.clips, 3, 8, 64, 64)
    result = {"lm": args.lm, "tokens": args.tokens, "clips": args.clips, "candidates": args.candidates,
              "repeats": args.repeats, "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
              "generation": generation_rates(model, video, args.tokens, args.candidates, args.repeats)}
    print(json.dumps(result["generation"], indent=2), flush=True)
    if args.videos:
        result["narrate"] = narrate_processes(args.lm, args.videos, args.videos_per_shard, os.cpu_count() or 1)
        print(json.dumps(result["narrate"], indent=2), flush=True)
    if args.out:
        command = "python eval/bench/narrate.py " + " ".join(sys.argv[1:])
        Path(args.out).write_text(markdown(result, command))
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
