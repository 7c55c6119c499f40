"""`mmvssl narrate ...`, `mmvssl rephrase ...` and `mmvssl tokenizer train ...`: the narrator's commands."""

import json


def _narrate(args) -> None:
    from ..data.shardio import MemberLimits
    from ..narrate import narrate
    from ..narrator.generate import GenerationConfig
    gen = GenerationConfig(num_candidates=args.num_candidates, max_length=args.max_length, top_p=args.top_p,
                           temperature=args.temperature, strategy=args.strategy, num_beams=args.num_beams,
                           seed=args.seed)
    counts = narrate(args.model, args.input, args.out, window_seconds=args.window_seconds, stride=args.stride,
                     shards_out=args.shards_out, gen=gen, batch_size=args.batch_size,
                     limits=MemberLimits(args.max_member_mb, args.max_text_member_mb))
    if not _is_main():  # under torchrun the counts are over every process: rank 0 tells them
        return
    print(f"narrated {counts['windows']} windows of {counts['videos']} videos "
          f"({counts['skipped_done']} already done, {len(counts['failed'])} videos skipped) -> {args.out}")


def _rephrase(args) -> None:
    from ..narrator.rephrase import RephraseConfig, rephrase_shards
    cfg = RephraseConfig(k=args.k, strategy=args.strategy, top_p=args.top_p, temperature=args.temperature,
                         num_beams=args.num_beams, max_length=args.max_length, batch_size=args.batch_size,
                         prompt=args.prompt, seed=args.seed)
    counts = rephrase_shards(args.t5_dir, args.shards, args.out, cfg, samples_per_shard=args.samples_per_shard,
                             overwrite=args.overwrite)
    if not _is_main():
        return
    print(json.dumps({**counts, "out": args.out}))


def _is_main() -> bool:
    from ..data.workshare import Share
    return Share.from_env().is_main


def _tokenizer_train(args) -> None:
    from ..narrator.tokenizer import SentencePieceTokenizer, texts_from_shards, train_sentencepiece
    texts = texts_from_shards(args.shards)
    path = train_sentencepiece(texts, args.out, args.vocab_size)
    print(json.dumps({"model": str(path), "texts": len(texts), "vocab_size": SentencePieceTokenizer(path).vocab_size}))


def register(sub) -> None:
    n = sub.add_parser("narrate", help="write pseudo-narrations for every window of videos or shards")
    n.add_argument("model", help="a trained narrator folder")
    n.add_argument("--input", required=True, help="a folder of videos, or shards (folder of .tar, pattern)")
    n.add_argument("--out", required=True, help="narrations.jsonl (appended; re-running resumes)")
    n.add_argument("--window-seconds", type=float, default=None, help="default: the narrator's training window")
    n.add_argument("--stride", type=float, default=None, help="seconds between window starts (default: the window)")
    n.add_argument("--shards-out", default=None, help="also write shards with the narrations in each sample's metadata")
    n.add_argument("--strategy", choices=["sample", "greedy", "beam"], default="sample",
                   help="sample (default; LaViLa's pseudo-narrations: main_infer_narrator.py), greedy or beam")
    n.add_argument("--num-candidates", type=int, default=10,
                   help="sampled narrations per window, all written to the lines and the shards (LaViLa: 10)")
    n.add_argument("--num-beams", type=int, default=5)
    n.add_argument("--top-p", type=float, default=0.95)
    n.add_argument("--temperature", type=float, default=0.7)
    n.add_argument("--max-length", type=int, default=77)
    n.add_argument("--batch-size", type=int, default=8)
    n.add_argument("--max-member-mb", type=float, default=1024.0,
                   help="refuse shard members (videos) larger than this, from the tar header (default 1024)")
    n.add_argument("--max-text-member-mb", type=float, default=16.0,
                   help="refuse .json / .txt members larger than this (default 16)")
    n.add_argument("--seed", type=int, default=0, help="each window samples with a generator seeded by this, "
                   "its key and its start (recorded with the narrations)")
    n.set_defaults(func=_narrate)

    r = sub.add_parser("rephrase", help="write shards whose human narrations carry K T5 paraphrases each")
    r.add_argument("t5_dir", help="a local T5 paraphraser folder (save_pretrained: model and tokenizer)")
    r.add_argument("--shards", required=True, help="input shards (folder of .tar, pattern)")
    r.add_argument("--out", required=True, help="folder for the new shards")
    r.add_argument("--k", type=int, default=3, help="paraphrases per narration")
    r.add_argument("--strategy", choices=["sample", "beam"], default="sample")
    r.add_argument("--top-p", type=float, default=0.95)
    r.add_argument("--temperature", type=float, default=0.7)
    r.add_argument("--num-beams", type=int, default=5)
    r.add_argument("--max-length", type=int, default=64)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--prompt", default="paraphrase: ")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--samples-per-shard", type=int, default=None,
                   help="cut the output into shards of this many samples (default: one per input shard, same name)")
    r.add_argument("--overwrite", action="store_true", help="replace a folder written with other settings")
    r.set_defaults(func=_rephrase)

    tok = sub.add_parser("tokenizer", help="narrator tokenizers").add_subparsers(dest="action", required=True)
    t = tok.add_parser("train", help="fit a sentencepiece model on the captions and narrations of a shard set")
    t.add_argument("--shards", required=True)
    t.add_argument("--out", required=True, help="the .model file to write")
    t.add_argument("--vocab-size", type=int, default=1000)
    t.set_defaults(func=_tokenizer_train)
