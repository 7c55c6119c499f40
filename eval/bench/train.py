"""Training benchmark (a script, not a test): `python eval/bench/train.py [--out docs/benchmarks/train.md]`.

1. Step throughput and peak memory of vatt-tiny on CPU (the demo's batch: 16 clips of 8 frames
   at 64 x 64, 2 s of audio, 2 captions of 32 tokens), for plain steps, feature-cached
   accumulation (train.accum_steps=4), gradient checkpointing and bf16 autocast. Each case runs
   in its own process, so that its peak resident memory (ru_maxrss) is its own.
2. Memory of the contrastive logits for a global batch of 4096 over 8 ranks: the local rows
   (512 x 4096) that each rank computes versus the full 4096 x 4096 matrix of one process,
   measured as the bytes the loss saves for backward, rank gathering simulated in one process.

About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CASES = {"fp32": {}, "fp32, accum_steps=4": {"accum": 4}, "fp32, grad checkpointing": {"ckpt": True},
         "bf16 autocast": {"precision": "bf16"}}


def run_case(accum: int = 1, ckpt: bool = False, precision: str = "no", batch_size: int = 16, steps: int = 6) -> dict:
    """Time `steps` optimiser steps (after 2 warm-up steps) on a fixed random batch."""
    from accelerate import Accelerator

    import mmvssl
    from mmvssl.losses.objective import Objective
    from mmvssl.train.optim import build_optimizer
    from mmvssl.train.step import forward_backward
    torch.manual_seed(0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    model = mmvssl.create_model("vatt-tiny")
    for m in model.modules():
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = ckpt
    objective = Objective([{"name": "va", "loss": "nce", "inputs": ["video_va", "audio_va"]},
                           {"name": "vt", "loss": "mil_nce", "inputs": ["video_vat", "text_vat"]}])
    optimizer = build_optimizer(model, 1e-4, 0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {"video": torch.randn(batch_size, 3, 8, 64, 64), "audio": torch.randn(batch_size, 32000) * 0.1,
             "text": torch.randint(1, 49000, (batch_size, 2, 32)), "text_mask": torch.ones(batch_size, 2, dtype=torch.bool)}
    times = []
    for i in range(steps + 2):
        tic = time.perf_counter()
        forward_backward(model, objective, batch, accelerator, accum)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - tic)
    per_step = sorted(times)[len(times) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_s": per_step, "samples_per_s": batch_size / per_step, "peak_rss_mib": peak / 1024,
            "rss_over_start_mib": (peak - base_rss) / 1024}


def saved_bytes(fn) -> int:
    """Bytes of the tensors that `fn()`'s autograd graph keeps for backward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def logits_memory(global_batch: int = 4096, world: int = 8, dim: int = 512, k: int = 2) -> list[dict]:
    """Per-rank loss memory (local rows of the gathered logits) vs one process's full matrix."""
    from mmvssl.losses import contrastive
    torch.manual_seed(0)
    norm = torch.nn.functional.normalize
    a = norm(torch.randn(global_batch, dim), dim=-1).requires_grad_()
    b = norm(torch.randn(global_batch, dim), dim=-1).requires_grad_()
    t = norm(torch.randn(global_batch, k, dim), dim=-1).requires_grad_()
    local = global_batch // world
    rows = []
    losses = {"nce": lambda x, y, tt: contrastive.nce_loss(x, y),
              "siglip": lambda x, y, tt: contrastive.siglip_loss(x, y),
              f"mil_nce (K={k})": lambda x, y, tt: contrastive.mil_nce_loss(x, tt)}
    real = (contrastive.world, contrastive.gather_with_grad, contrastive.gather_no_grad)
    for name, loss in losses.items():
        contrastive.world, contrastive.gather_with_grad, contrastive.gather_no_grad = real
        full = saved_bytes(lambda: loss(a, b, t))
        # rank 3 of 8: it holds rows 3*local..4*local, and "gathers" everyone's features
        rank = 3
        sl = slice(rank * local, (rank + 1) * local)
        full_by_shape = {tuple(x.shape[1:]): x for x in (b, t)}
        contrastive.world = lambda: (rank, world)
        contrastive.gather_with_grad = lambda x: full_by_shape[tuple(x.shape[1:])]
        contrastive.gather_no_grad = lambda x: torch.ones(global_batch, *x.shape[1:], dtype=x.dtype)
        part = saved_bytes(lambda: loss(a[sl], b[sl], t[sl]))
        contrastive.world, contrastive.gather_with_grad, contrastive.gather_no_grad = real
        rows.append({"loss": name, "full_mib": full / 2**20, "local_mib": part / 2**20,
                     "logits_full_mib": global_batch * global_batch * k ** (name.startswith("mil")) * 4 / 2**20,
                     "logits_local_mib": local * global_batch * k ** (name.startswith("mil")) * 4 / 2**20})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the figures as markdown here (e.g. docs/benchmarks/train.md)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(**CASES[args.case])))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = {}
    for name in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True, env=env)
        if out.returncode:
            results[name] = {"error": out.stderr.strip().splitlines()[-1]}
        else:
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    memory = logits_memory()
    for row in memory:
        print(row, flush=True)
    text = report(results, memory)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def report(results: dict, memory: list[dict]) -> str:
    load = os.getloadavg()[0]
    lines = ["# Training benchmark", "",
             f"`python eval/bench/train.py --out docs/benchmarks/train.md` on {platform.machine()}, "
             f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"load average {load:.1f} when it finished (the cores are shared: throughput is a lower bound).", "",
             "## vatt-tiny steps on CPU", "",
             "Batch of 16 (8 frames of 64 x 64, 2 s of audio, 2 captions of 32 tokens), NCE (va) + MIL-NCE (vat), "
             "AdamW; median of 6 steps after 2 warm-up steps; no data loading. Peak memory is the process's "
             "peak resident set (ru_maxrss), and its growth over the process before the model was built.", "",
             "| case | s / step | samples / s | peak RSS (MiB) | growth (MiB) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {name} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | {r['peak_rss_mib']:.0f} "
                         f"| {r['rss_over_start_mib']:.0f} |")
    lines += ["", "## Contrastive logits: local rows vs the full matrix", "",
              "Global batch 4096 over 8 ranks (512 per rank), 512-d embeddings, fp32. `logits` is the size of one "
              "logits tensor (MIL-NCE: B x N x K scores, K = 2); `saved for backward` is what the loss's autograd "
              "graph keeps, measured (every rank gathers all features; rank 3 simulated in one process). The per-rank figure is not 1/8 of the full one because the gathered features (4096 x 512 x 4 B = 8 MiB per tensor) are kept whole on every rank.", "",
              "| loss | logits, full (MiB) | logits, per rank (MiB) | saved for backward, full (MiB) "
              "| saved for backward, per rank (MiB) | ratio |", "|---|---|---|---|---|---|"]
    for m in memory:
        lines.append(f"| {m['loss']} | {m['logits_full_mib']:.0f} | {m['logits_local_mib']:.0f} | {m['full_mib']:.0f} "
                     f"| {m['local_mib']:.0f} | {m['full_mib'] / max(m['local_mib'], 1e-9):.1f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
