"""Benchmark the model zoo's training step: forward + backward clips/s and peak memory.

Runs, for vatt-tiny and VATT-Small (vatt-small at VATT's input size, 32 x 224² video, 3.2 s of
48 kHz audio), one training step (all three encoders, FAC heads, an InfoNCE loss per space, backward):
  - DropToken 0.5 (the VATT recipe) versus none: the time ratio (target <= 0.6)
  - SDPA attention versus a plain matmul-softmax attention (with DropToken 0.5)
FLOPs are model FLOPs (forward + backward, counted on the meta device), so TFLOP/s and MFU do not
depend on which attention kernel ran.
On a GPU it runs in bf16 autocast and reports the model FLOP utilisation (MFU) against the card's
peak dense bf16 throughput. A script, not a test:

    .venv/bin/python eval/bench/model.py                 # CPU, ~2-3 min on 2 cores
    .venv/bin/python eval/bench/model.py --device cuda --batch-small 16 --iters-small 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import threading
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import mmvssl
from mmvssl.models.accounting import build_on_meta, example_inputs
from mmvssl.models.transformer import set_attention_impl

# dense bf16 peak TFLOP/s (no sparsity), by a substring of torch.cuda.get_device_name()
GPU_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                        "A10G": 70.0, "RTX 4090": 165.0, "V100": 125.0}


class PeakRSS:
    """Samples the process's resident memory in a thread; `peak` is the highest seen (bytes)."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every_s)

    def __enter__(self):
        self.base = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    logits = a @ b.T / temperature  # (B, B)
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_step(model, batch, device) -> None:
    bf16 = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    with bf16:
        out = model(batch)
        loss = (info_nce(out["video_va"].float(), out["audio_va"].float())
                + info_nce(out["video_vat"].float(), out["text_vat"][:, 0].float()))
    loss.backward()
    model.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_flops(config: dict, batch_size: int) -> float:
    """Forward + backward FLOPs of one step, counted on the meta device with the plain attention
    (every matmul visible to the counter, whichever kernel the timed run uses)."""
    model = build_on_meta(config).train()
    set_attention_impl(model, "math")
    with FlopCounterMode(display=False) as counter:
        train_step(model, example_inputs(config, batch=batch_size, candidates=1, device="meta"), torch.device("meta"))
    return counter.get_total_flops()


def measure(preset: str, batch_size: int, warmup: int, iters: int, device: torch.device, drop_token: float,
            attention: str) -> dict:
    overrides = {"video.drop_token": drop_token, "audio.drop_token": drop_token}
    torch.manual_seed(0)
    model = mmvssl.create_model(preset, **overrides).to(device).train()
    set_attention_impl(model, attention)
    flops = model_flops(model.config, batch_size)
    batch = example_inputs(model.config, batch=batch_size, candidates=1, device=device)
    for _ in range(warmup):
        train_step(model, batch, device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        tic = time.perf_counter()
        for _ in range(iters):
            train_step(model, batch, device)
        sync(device)
        seconds = (time.perf_counter() - tic) / iters
    row = {"preset": preset, "batch": batch_size, "drop_token": model.config["video"].get("drop_token", 0.0),
           "attention": attention, "s_per_step": seconds, "clips_per_s": batch_size / seconds,
           "gflop_per_step": flops / 1e9, "achieved_tflops": flops / seconds / 1e12,
           "peak_rss_gib": mem.peak / 2 ** 30, "rss_growth_gib": (mem.peak - mem.base) / 2 ** 30}
    if device.type == "cuda":
        row["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del model
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters-tiny", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--iters-small", type=int, default=1, help="timed steps (after 1 warm-up step)")
    parser.add_argument("--batch-tiny", type=int, default=8)
    parser.add_argument("--batch-small", type=int, default=2, help="the FAC heads' BatchNorm needs >= 2")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the accelerator's dense bf16 peak")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    tiny, small = (args.batch_tiny, 2, args.iters_tiny), (args.batch_small, 1, args.iters_small)
    runs = [("vatt-tiny", *tiny, 0.0, "sdpa"), ("vatt-tiny", *tiny, 0.5, "sdpa"), ("vatt-tiny", *tiny, 0.5, "math"),
            ("vatt-small", *small, 0.0, "sdpa"), ("vatt-small", *small, 0.5, "sdpa"),
            ("vatt-small", *small, 0.5, "math")]
    rows = []
    for preset, batch_size, warmup, iters, drop, attention in runs:
        rows.append(measure(preset, batch_size, warmup, iters, device, drop, attention))
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)

    def time_of(preset, drop, attention):
        return next(r["s_per_step"] for r in rows
                    if r["preset"] == preset and r["drop_token"] == drop and r["attention"] == attention)

    peak = args.peak_tflops
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    if device.type == "cuda" and peak is None:
        peak = next((v for k, v in GPU_PEAK_BF16_TFLOPS.items() if k in name), None)
    print(f"\ndevice: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| preset | batch | DropToken | attention | s/step | clips/s | GFLOP/step | TFLOP/s | "
          + ("MFU | peak GPU GiB |" if device.type == "cuda" else "peak RSS GiB | RSS growth GiB |"))
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tail = (f"{100 * r['achieved_tflops'] / peak:.1f}% | {r['peak_gpu_mem_gib']:.2f} |" if device.type == "cuda"
                and peak else f"{r['peak_rss_gib']:.2f} | {r['rss_growth_gib']:.2f} |")
        print(f"| {r['preset']} | {r['batch']} | {r['drop_token']} | {r['attention']} | {r['s_per_step']:.3f} | "
              f"{r['clips_per_s']:.2f} | {r['gflop_per_step']:.1f} | {r['achieved_tflops']:.3f} | {tail}")
    for preset in ("vatt-tiny", "vatt-small"):
        print(f"{preset}: DropToken 0.5 / none time = {time_of(preset, 0.5, 'sdpa') / time_of(preset, 0.0, 'sdpa'):.2f}")
    for preset in ("vatt-tiny", "vatt-small"):
        print(f"{preset}: SDPA / plain attention time (DropToken 0.5) = "
              f"{time_of(preset, 0.5, 'sdpa') / time_of(preset, 0.5, 'math'):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
