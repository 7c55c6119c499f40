"""Batched narration with a KV cache: nucleus sampling (LaViLa's defaults), greedy, beam search.

LaViLa re-runs the whole prefix at every token; here each step feeds only the newest token and
GPT-2 keeps the keys and values of the prefix (`use_cache=False` re-runs the prefix, for tests
and the benchmark). The visual context is computed once per clip, and with the cache so are the
keys and values each gated cross-attention layer projects from it (Narrator.visual_kv): a clip's
candidates ask them as extra queries, never copied per candidate (eval/bench/narrate.py measures both).
Sampling defaults are LaViLa's pseudo-narration settings (facebookresearch/LaViLa
main_infer_narrator.py: multinomial sampling, top_p 0.95, temperature 0.7, 10 return sequences,
77 tokens). With `seeds` (one per clip), each clip draws from its own generator, so its draws
depend on its seed, not on the other clips of the batch (`mmvssl narrate` seeds each window by the
run's seed and the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import Narrator


@dataclass
class GenerationConfig:
    num_candidates: int = 10
    max_length: int = 77
    top_p: float = 0.95
    temperature: float = 0.7
    strategy: str = "sample"  # sample | greedy | beam
    num_beams: int = 5
    use_cache: bool = True
    seed: int | None = 0


def _nucleus(logits: torch.Tensor, top_p: float, generator: torch.Generator | list[torch.Generator] | None
             ) -> torch.Tensor:
    """Sample one token per row from the smallest set of tokens whose probability reaches top_p.
    `generator`: one for all rows, or a list of G generators for G equal runs of consecutive rows
    (one per clip: its candidates)."""
    probs = logits.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the token that crosses top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    if isinstance(generator, list):  # (G x n, V): each clip's n rows from its own generator
        choice = torch.cat([torch.multinomial(rows, 1, generator=g)
                            for rows, g in zip(sorted_probs.chunk(len(generator)), generator)])
    else:
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (N, 1), renormalised inside
    return order.gather(1, choice).squeeze(1)


def _forbid_special(logits: torch.Tensor, model: Narrator) -> torch.Tensor:
    """Padding and the start token are never generated: an untrained (or briefly trained) model
    could otherwise pick them, and a generated pad would read as the end of the sequence."""
    banned = [i for i in {model.pad_id, model.bos_id} if i is not None and i >= 0 and i != model.eos_id]
    if banned:
        logits = logits.clone()
        logits[..., banned] = float("-inf")
    return logits


def _step(model: Narrator, ids: torch.Tensor, visual, cache, use_cache: bool):
    inp = ids[:, -1:] if (use_cache and cache is not None) else ids
    logits, cache = model.lm_forward(inp, visual, cache=cache if use_cache else None, use_cache=use_cache)
    return _forbid_special(logits[:, -1].float(), model), cache


@torch.no_grad()
def generate(model: Narrator, video: torch.Tensor, cfg: GenerationConfig = GenerationConfig(),
             seeds: list[int] | None = None) -> list[list[dict]]:
    """(B, 3, T, H, W) clips -> per clip a list of {"tokens", "score"} (score: mean log-probability
    of the generated tokens, end token included), best first. `seeds` (B,): with sampling, clip b
    draws from a generator seeded by seeds[b] (instead of one generator seeded by cfg.seed)."""
    if seeds is not None and len(seeds) != video.shape[0]:
        raise ValueError(f"generate: {len(seeds)} seeds for {video.shape[0]} clips")
    model.eval()
    if cfg.strategy == "beam":
        return _beam_search(model, video, cfg)
    B = video.shape[0]
    n = 1 if cfg.strategy == "greedy" else cfg.num_candidates
    visual = model.encode_visual(video)  # (B, Q, D)
    if cfg.use_cache:  # each gated layer's keys and values of each clip, once: its n candidates share them
        visual = model.visual_kv(visual)
    else:  # LaViLa's way: the context repeated per candidate, projected again at every token
        visual = visual.repeat_interleave(n, dim=0)  # (B*n, Q, D)
    ids = torch.full((B * n, 1), model.bos_id, dtype=torch.long, device=video.device)
    logp_sum = torch.zeros(B * n, device=video.device)
    length = torch.zeros(B * n, device=video.device)
    done = torch.zeros(B * n, dtype=torch.bool, device=video.device)
    generator = None
    if seeds is not None and cfg.strategy == "sample":
        generator = [torch.Generator(device=video.device).manual_seed(int(s)) for s in seeds]
    elif cfg.seed is not None and cfg.strategy == "sample":
        generator = torch.Generator(device=video.device).manual_seed(cfg.seed)
    cache = None
    for _ in range(cfg.max_length - 1):
        logits, cache = _step(model, ids, visual, cache, cfg.use_cache)
        logp = logits.log_softmax(dim=-1)
        if cfg.strategy == "greedy":
            nxt = logits.argmax(dim=-1)
        else:
            nxt = _nucleus(logits / cfg.temperature, cfg.top_p, generator)
        nxt = nxt.masked_fill(done, model.pad_id)
        logp_sum += logp.gather(1, nxt[:, None]).squeeze(1).masked_fill(done, 0.0)
        length += (~done).float()
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == model.eos_id
        if bool(done.all()):
            break
    scores = (logp_sum / length.clamp(min=1)).view(B, n)
    ids = ids.view(B, n, -1)
    out = []
    for b in range(B):
        order = scores[b].argsort(descending=True)
        out.append([{"tokens": ids[b, i].tolist(), "score": scores[b, i].item()} for i in order.tolist()])
    return out


def _beam_search(model: Narrator, video: torch.Tensor, cfg: GenerationConfig) -> list[list[dict]]:
    """Beam search per clip (beams as a batch), length-normalised scores; returns the final beams."""
    k = cfg.num_beams
    results = []
    for b in range(video.shape[0]):
        visual = model.encode_visual(video[b:b + 1])  # (1, Q, D): the k beams share it
        visual = model.visual_kv(visual) if cfg.use_cache else visual.expand(k, -1, -1)
        ids = torch.full((k, 1), model.bos_id, dtype=torch.long, device=video.device)
        total = torch.full((k,), float("-inf"), device=video.device)
        total[0] = 0.0  # all beams start identical: expand only the first
        finished: list[tuple[float, list[int]]] = []
        cache = None
        for step in range(cfg.max_length - 1):
            logits, cache = _step(model, ids, visual, cache, cfg.use_cache)
            cand = (total[:, None] + logits.log_softmax(dim=-1)).view(-1)  # (k * V,)
            top, flat = cand.topk(2 * k)
            vocab = logits.shape[-1]
            keep_beam, keep_tok, keep_score = [], [], []
            for score, idx in zip(top.tolist(), flat.tolist()):
                beam, tok = divmod(idx, vocab)
                if tok == model.eos_id:
                    finished.append((score / (step + 1), ids[beam].tolist() + [tok]))
                else:
                    keep_beam.append(beam), keep_tok.append(tok), keep_score.append(score)
                if len(keep_beam) == k:
                    break
            if len(finished) >= k or not keep_beam:
                break
            beam_idx = torch.tensor(keep_beam, device=video.device)
            ids = torch.cat([ids[beam_idx], torch.tensor(keep_tok, device=video.device)[:, None]], dim=1)
            total = torch.tensor(keep_score, device=video.device)
            if cache is not None and cfg.use_cache:
                cache.reorder_cache(beam_idx)
        if len(finished) < k:
            finished += [(s / ids.shape[1], seq) for s, seq in zip(total.tolist(), ids.tolist())]
        finished.sort(key=lambda x: -x[0])
        results.append([{"tokens": seq, "score": score} for score, seq in finished[:k]])
    return results


def sequence_logprob(model: Narrator, video: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of each given (B, L) token sequence (bos first, padded) for its clip,
    under the same distribution as generation (padding and the start token excluded)."""
    logits, _ = model.lm_forward(ids, model.encode_visual(video), attention_mask=(ids != model.pad_id).long())
    logp = F.log_softmax(_forbid_special(logits[:, :-1].float(), model), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
    mask = (ids[:, 1:] != model.pad_id).float()
    return (logp * mask).sum(1) / mask.sum(1).clamp(min=1)
