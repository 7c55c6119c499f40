"""Narration quality of a trained narrator on held-out shards.

    python eval/narration.py MODEL --data SHARDS [--strategy beam|greedy|sample] [--out report.json]

One narration per clip: by default the best of a 5-beam search (the usual decoding for caption
metrics, as COCO captioning evaluates); `--strategy greedy` takes the most likely token at each
step, `sample` the best-scored of LaViLa's 10 nucleus samples (top_p 0.95, temperature 0.7).

Prints one JSON object: `object_accuracy` (the share of clips whose narration names the clip's
object, i.e. its `label`, as a word), `chance` (1 / number of distinct labels: naming one at
random), `confusion` (for each label, how often each class was the first one named), and the
captioning metrics BLEU-4, ROUGE-L and CIDEr (pycocoevalcap, the COCO caption
implementation, pure Python) against the clip's caption and the narrations of its window.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch


def word_position(text: str, word: str) -> int | None:
    match = re.search(rf"\b{re.escape(word.lower())}\b", text.lower())
    return None if match is None else match.start()


def mentions(text: str, word: str) -> bool:
    return word_position(text, word) is not None


def first_named(text: str, classes: list[str]) -> str | None:
    """The class the text names first (None: it names none)."""
    found = [(pos, c) for c in classes if (pos := word_position(text, c)) is not None]
    return min(found)[1] if found else None


def confusion(labels: list[str], texts: list[str], classes: list[str]) -> dict[str, dict[str, int]]:
    """For each true label, how often each class was the first one named ("none": no class named)."""
    table = {label: {name: 0 for name in [*classes, "none"]} for label in classes}
    for label, text in zip(labels, texts):
        if label:
            table[label][first_named(text, classes) or "none"] += 1
    return table


def caption_metrics(references: dict[int, list[str]], hypotheses: dict[int, list[str]]) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    def tok(texts):  # the PTB tokenizer needs Java; lower-case word split is the same for this text
        return [" ".join(re.findall(r"[a-z0-9]+", t.lower())) for t in texts]
    refs = {k: tok(v) for k, v in references.items()}
    hyps = {k: tok(v) for k, v in hypotheses.items()}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    rouge, _ = Rouge().compute_score(refs, hyps)
    cider, _ = Cider().compute_score(refs, hyps)
    return {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider": float(cider)}


@torch.no_grad()
def evaluate_narrator(model_dir: str, shards: str, strategy: str = "beam", batch_size: int = 16,
                      max_clips: int | None = None) -> dict:
    from mmvssl.data.loader import SampleSpec, build_loader
    from mmvssl.narrator.generate import GenerationConfig, generate
    from mmvssl.narrator.model import Narrator
    from mmvssl.narrator.tokenizer import SentencePieceTokenizer

    model = Narrator.from_pretrained(model_dir).eval()
    tokenizer = SentencePieceTokenizer(Path(model_dir) / model.config.get("tokenizer", "tokenizer.model"))
    s = model.config.get("sampling", {"num_frames": 8, "fps": 4.0, "size": 64})
    spec = SampleSpec(num_frames=s["num_frames"], fps=s["fps"], size=s["size"], audio_rate=8000,
                      context_length=8, num_candidates=1, train=False)
    gen = GenerationConfig(strategy=strategy, num_candidates=10 if strategy == "sample" else 1, num_beams=5,
                           max_length=model.config["lm"].get("n_positions", 64))
    labels, texts, hits, refs, hyps, examples = [], [], 0, {}, {}, []
    for batch in build_loader(shards, spec, batch_size):
        for meta, candidates in zip(batch["meta"], generate(model, batch["video"], gen)):
            text = tokenizer.decode(candidates[0]["tokens"])
            i = len(labels)
            labels.append(str(meta.get("label", "")))
            texts.append(text)
            hits += bool(labels[-1]) and mentions(text, labels[-1])
            start, end = meta["window"]
            window_refs = [n["text"] for n in meta.get("narrations") or []
                           if float(n["start"]) < end and float(n["end"]) > start]
            refs[i] = [r for r in [meta.get("caption"), *window_refs] if r] or [""]
            hyps[i] = [text]
            if len(examples) < 5:
                examples.append({"key": meta.get("source"), "reference": refs[i][0], "narration": text})
        if max_clips and len(labels) >= max_clips:
            break
    if not labels or not any(labels):
        raise SystemExit(f"error: no labelled clips in {shards} (object accuracy needs a 'label' in the metadata)")
    classes = sorted(set(label for label in labels if label))
    return {"object_accuracy": hits / len(labels), "chance": 1.0 / len(classes), "num_clips": len(labels),
            "classes": classes, "confusion": confusion(labels, texts, classes),
            **caption_metrics(refs, hyps), "strategy": strategy, "examples": examples,
            "model": str(model_dir), "data": str(shards)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--strategy", default="beam", choices=["beam", "greedy", "sample"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-clips", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    report = evaluate_narrator(args.model, args.data, args.strategy, args.batch_size, args.max_clips)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
