"""Narrator generation speed: tokens/s with the KV cache vs re-running the prefix at every token
(LaViLa's way), and windows/s of `mmvssl narrate` end to end (decode + generate) on CPU.

    python eval/bench/narrate.py [--lm tiny|small|gpt2] [--tokens 40] [--out docs/benchmarks/narrate.md]

The narrator is built from config with random weights and open gates (speed does not depend on
the weights); generation is forced to run `--tokens` steps (no end token) so both paths do the
same work. Target: the cache at least 3x faster.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def build(lm: str, vocab: int = 1000):
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


def tokens_per_second(model, video, tokens: int, candidates: int, use_cache: bool, repeats: int = 3) -> float:
    from mmvssl.narrator.generate import GenerationConfig, generate
    cfg = GenerationConfig(num_candidates=candidates, max_length=tokens + 1, use_cache=use_cache, seed=0)
    generate(model, video, GenerationConfig(num_candidates=2, max_length=4, use_cache=use_cache))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, video, cfg)
        best = min(best, time.perf_counter() - start)
    return video.shape[0] * candidates * tokens / best


def narrate_windows_per_second(lm: str) -> dict:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.helpers_data.media import make_media  # the test suite's generator: H.264 + AAC clips

    from mmvssl.narrate import narrate
    from mmvssl.narrator.generate import GenerationConfig
    from mmvssl.narrator.tokenizer import SentencePieceTokenizer, train_sentencepiece
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_file = train_sentencepiece([f"a red circle number {i} moves" for i in range(200)], tmp / "t.model", 100)
        tok = SentencePieceTokenizer(tok_file)
        model = build(lm, tok.vocab_size)
        model.config.update(pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
        model.save_pretrained(tmp / "narrator", tokenizer_file=tok_file)
        for i in range(2):
            make_media(tmp / "videos" / f"v{i}.mp4", seconds=10.0, size=(320, 240), mark=False)
        start = time.perf_counter()
        counts = narrate(str(tmp / "narrator"), str(tmp / "videos"), str(tmp / "n.jsonl"),
                         gen=GenerationConfig(num_candidates=10, max_length=20), progress=False)
        elapsed = time.perf_counter() - start
    return {"windows": counts["windows"], "seconds": elapsed, "windows_per_s": counts["windows"] / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm", default="small", choices=["tiny", "small", "gpt2"])
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = build(args.lm)
    video = torch.randn(args.clips, 3, 8, 64, 64)
    with torch.no_grad():
        cached = tokens_per_second(model, video, args.tokens, args.candidates, use_cache=True)
        rerun = tokens_per_second(model, video, args.tokens, args.candidates, use_cache=False)
    windows = narrate_windows_per_second(args.lm)
    result = {"lm": args.lm, "tokens": args.tokens, "clips": args.clips, "candidates": args.candidates,
              "tokens_per_s_cache": cached, "tokens_per_s_rerun_prefix": rerun, "speedup": cached / rerun,
              "narrate": windows, "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(
            "# Narrator generation benchmark\n\n"
            f"`python eval/bench/narrate.py --lm {args.lm} --tokens {args.tokens}` on CPU "
            f"({torch.get_num_threads()} threads). GPT-2 '{args.lm}' with gated cross-attention in every block, "
            f"{args.clips} clips x {args.candidates} nucleus-sampled candidates, {args.tokens} tokens each.\n\n"
            "| path | tokens/s |\n|---|---|\n"
            f"| KV cache (mmvssl) | {cached:.0f} |\n| re-run the prefix every token (LaViLa) | {rerun:.0f} |\n"
            f"| speed-up | **{cached / rerun:.1f}x** (target >= 3x) |\n\n"
            f"`mmvssl narrate` end to end (decode 2 s windows of two 10 s 320x240 videos, 10 candidates of up to "
            f"19 tokens each): {windows['windows']} windows in {windows['seconds']:.1f} s = "
            f"**{windows['windows_per_s']:.2f} windows/s**.\n")


if __name__ == "__main__":
    main()
