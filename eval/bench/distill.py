"""Distillation benchmark (a script, not a test): `python eval/bench/distill.py [--out docs/benchmarks/distill.md]`.

1. Teacher throughput: frames per second of the frozen image teacher alone (mmvssl frames of
   64 x 64 converted and resized to the teacher's size, as in training), for the tiny test
   teacher (open_clip ViT, 32 px) and a ViT-B-32 (224 px) with random weights built from
   open_clip's own config (nothing downloaded). fp32 on CPU; bf16 on a GPU when there is one.
2. Training step time, online teacher vs cached features, measured in the same process: the
   vatt-tiny student with the demo distillation objective (configs/demo/distill.yaml's terms), a
   fixed batch of 8 clips of 8 frames at 64 x 64; online = the teacher on the batch + forward,
   backward and optimiser step; cached = the same step with `teacher_frames` already in the batch
   (as the loader gives them), the two kinds interleaved. Median of the timed steps after warm-up.
3. The one-off cost: `mmvssl shards add-features` end to end (decode, teacher, write) on 4
   procedural 3 s videos at 4 frames per second, and the loader's cost of pairing a sample's
   cached features with its frames.

Wall and CPU time of every measurement; one torch thread by default, so that CPU time measures
the work even on shared cores. About 2 minutes (`--quick`: the tiny teacher only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
STEPS = {"tiny": {"steps": 6, "warmup": 2}, "ViT-B-32": {"steps": 2, "warmup": 1}}  # timed / warm-up steps per kind


def demo_terms() -> list[dict]:
    """The objective terms of configs/demo/distill.yaml."""
    from mmvssl.config import load_config, to_dict
    from mmvssl.resources import data_path
    return to_dict(load_config(data_path("configs", "demo", "distill.yaml")).objective.terms)


def save_teacher(root: Path, name: str) -> tuple[str, str]:
    """(arch, checkpoint file) of open_clip model `name` (or the tiny config) with seeded random weights."""
    import open_clip
    arch = name
    if name == "tiny":
        path = root / "bench-tiny-teacher.json"
        path.write_text(json.dumps(TINY))
        open_clip.add_model_config(path)
        arch, name = str(path), path.stem
    torch.manual_seed(0)
    weights = root / f"{name}.pt"
    torch.save(open_clip.create_model(name).state_dict(), weights)
    return arch, str(weights)


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


class Clock:
    """Wall and CPU seconds of a block. CPU time (this process, all its threads) is what the work
    costs even when other jobs share the cores; on a GPU only the wall time means anything."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "Clock":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


def teacher_throughput(teacher, device: torch.device, frames: int = 16, repeats: int = 3) -> dict:
    """Frames per wall second and per CPU second of the teacher alone on mmvssl-normalised 64 x 64
    frames (median of `repeats` calls after 1 warm-up call)."""
    video = torch.randn(1, 3, frames, 64, 64, device=device)
    teacher(video)
    walls, cpus = [], []
    for _ in range(repeats):
        with Clock(device) as clock:
            teacher(video)
        walls.append(clock.wall)
        cpus.append(clock.cpu)
    return {"frames_per_s": frames / median(walls), "frames_per_cpu_s": frames / median(cpus)}


def step_times(teacher, device: torch.device, batch_size: int = 8, steps: int = 6, warmup: int = 2) -> dict:
    """Seconds per training step with the teacher run on the batch (online) and with its features
    given (cached), interleaved so that both see the same machine load."""
    from accelerate import Accelerator

    import mmvssl
    from mmvssl.losses.objective import Objective
    from mmvssl.train.optim import build_optimizer
    from mmvssl.train.step import forward_backward
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=device.type != "cuda")
    net = mmvssl.create_model("vatt-tiny")
    net.frame_features = True
    dims = {**net.output_dims(), "teacher_frames": teacher.embed_dim}
    objective = Objective(demo_terms(), feature_dims=dims).to(accelerator.device)
    optimizer = build_optimizer(net, 1e-4, 0.05, no_decay_modules=(objective,))
    model, optimizer = accelerator.prepare(net, optimizer)
    B = batch_size
    batch = {"video": torch.randn(B, 3, 8, 64, 64), "audio": torch.randn(B, 32000) * 0.1,
             "text": torch.randint(1, 49000, (B, 2, 32)), "text_mask": torch.ones(B, 2, dtype=torch.bool),
             "has_video": torch.ones(B, dtype=torch.bool), "has_audio": torch.ones(B, dtype=torch.bool),
             "has_text": torch.ones(B, dtype=torch.bool)}
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    cached = {**batch, **teacher(batch["video"])}  # (B, T, D) teacher_frames, as the loader supplies them

    def step(online: bool) -> Clock:
        with Clock(device) as clock:
            b = {**batch, **teacher(batch["video"])} if online else cached
            forward_backward(model, objective, b, accelerator, 1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return clock

    for _ in range(warmup):
        step(True), step(False)
    online, offline = [], []
    for _ in range(steps):
        online.append(step(True))
        offline.append(step(False))
    out = {"online_s": median([c.wall for c in online]), "cached_s": median([c.wall for c in offline]),
           "online_cpu_s": median([c.cpu for c in online]), "cached_cpu_s": median([c.cpu for c in offline])}
    return {**out, "ratio": out["online_s"] / out["cached_s"], "cpu_ratio": out["online_cpu_s"] / out["cached_cpu_s"]}


def add_features_cost(arch: str, weights: str, shards: Path, out: Path, device: torch.device) -> dict:
    from mmvssl.teacher.features import add_teacher_features
    with Clock(device) as clock:
        report = add_teacher_features(arch, weights, str(shards), out, fps=4.0, device=device.type, progress=False,
                                      overwrite=True)
    samples = sum(r["samples"] for r in report["shards"].values())
    frames = sum(r["frames"] for r in report["shards"].values())
    return {"seconds": clock.wall, "cpu_seconds": clock.cpu, "samples": samples, "frames": frames,
            "frames_per_s": frames / clock.wall, "frames_per_cpu_s": frames / clock.cpu}


def pairing_cost(repeats: int = 200) -> float:
    """Microseconds to parse one sample's cached features (2 min at 4 frames/s, D = 512) and pick 8 frames."""
    from mmvssl.teacher.cache import cached_times, encode_member, pair_cached_frames
    identity = {"arch": "ViT-B-32", "pretrained": "x", "weights": "x", "image_size": 224, "embed_dim": 512}
    times = cached_times(120.0, 4.0)
    raw = {"__key__": "k", "teacher.safetensors": encode_member(torch.randn(len(times), 512), times, identity,
                                                                 4.0, 224, 120.0)}
    sampled = torch.linspace(30.0, 32.0, 8, dtype=torch.float64)
    with Clock(torch.device("cpu")) as clock:
        for _ in range(repeats):
            pair_cached_frames(raw, sampled, identity)
    return clock.cpu / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the figures as markdown here (e.g. docs/benchmarks/distill.md)")
    parser.add_argument("--quick", action="store_true", help="the tiny teacher only")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: with several, threads spin at barriers while a sibling waits "
                             "for a shared core, and CPU time stops measuring the work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that random weights are random

    from mmvssl.data.shards import build_shards
    from mmvssl.data.synth import make_synthetic_dataset
    from mmvssl.teacher.model import load_teacher
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = ["tiny"] if args.quick else ["tiny", "ViT-B-32"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_synthetic_dataset(root / "data", seed=0, num_train=4, num_val=1, seconds=3.0)
        build_shards(root / "data" / "train", root / "shards", captions=root / "data" / "train" / "captions.jsonl",
                     samples_per_shard=8)
        for name in names:
            arch, weights = save_teacher(root, name)
            teacher = load_teacher(arch, weights, device=device)
            row = {"teacher": name, "image_size": teacher.image_size, "embed_dim": teacher.embed_dim,
                   **teacher_throughput(teacher, device)}
            print(name, f"teacher alone: {row['frames_per_s']:.1f} frames/s wall, "
                        f"{row['frames_per_cpu_s']:.1f} frames per CPU second", flush=True)
            row.update(step_times(teacher, device, **STEPS[name]))
            print(name, f"step wall: online {row['online_s']:.3f} s, cached {row['cached_s']:.3f} s, "
                        f"{row['ratio']:.2f}x; step CPU: online {row['online_cpu_s']:.3f} s, cached "
                        f"{row['cached_cpu_s']:.3f} s, {row['cpu_ratio']:.2f}x", flush=True)
            del teacher
            row["add_features"] = add_features_cost(arch, weights, root / "shards", root / f"out-{name}", device)
            a = row["add_features"]
            print(name, f"add-features: {a['samples']} samples ({a['frames']} frames) in {a['seconds']:.2f} s wall "
                        f"({a['frames_per_s']:.1f} frames/s), {a['cpu_seconds']:.2f} CPU s "
                        f"({a['frames_per_cpu_s']:.1f} frames per CPU second)", flush=True)
            rows.append(row)
    pairing_us = pairing_cost()
    print(f"loader pairing: {pairing_us:.0f} CPU us per sample", flush=True)
    text = report(rows, pairing_us, device)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def report(rows: list[dict], pairing_us: float, device: torch.device) -> str:
    gpu = device.type == "cuda"
    where = (torch.cuda.get_device_name(device) + ", bf16 teacher" if gpu
             else f"{platform.machine()}, {os.cpu_count()} CPU cores, fp32 teacher")
    lines = ["# Distillation benchmark: teacher throughput, cached features", "",
             f"`python eval/bench/distill.py --out docs/benchmarks/distill.md` on {where}, torch {torch.__version__}; "
             f"{torch.get_num_threads()} thread(s) (one thread: figures per core); "
             f"load average {os.getloadavg()[0]:.1f} when it finished. Wall times depend on what else runs on "
             f"shared cores; CPU times (this process) count the work itself, so on a loaded machine the "
             f"CPU-time figures and their ratio are the ones to trust. Teachers have random weights (the tiny test "
             f"config, and ViT-B-32 from open_clip's config): speed does not depend on the weights.", "",
             "## The teacher alone", "",
             "`ImageTeacher` on mmvssl-normalised 64 x 64 frames (un-normalised, resized to the teacher's size, its "
             "own mean / std), 16 frames per call, median of 3 calls after a warm-up.", "",
             "| teacher | image size | D | frames / s (wall) | frames / CPU s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['teacher']} | {r['image_size']} | {r['embed_dim']} | {r['frames_per_s']:.1f} "
                     f"| {r['frames_per_cpu_s']:.1f} |")
    lines += ["", "## Training step: online teacher vs cached features", "",
              "vatt-tiny student, configs/demo/distill.yaml's terms (NCE va, MIL-NCE vt, distill_frames, distill_clip), "
              "a fixed batch of 8 clips x 8 frames at 64 x 64 (64 teacher frames per step), AdamW; the median of "
              "6 steps of each kind for the tiny teacher (2 for ViT-B-32), interleaved online / cached, after 2 (1) "
              "warm-up steps of each; no data loading.", "",
              "| teacher | online, s / step (wall) | cached, s / step (wall) | wall ratio | online, CPU s / step "
              "| cached, CPU s / step | CPU ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['teacher']} | {r['online_s']:.3f} | {r['cached_s']:.3f} | {r['ratio']:.2f}x "
                     f"| {r['online_cpu_s']:.3f} | {r['cached_cpu_s']:.3f} | **{r['cpu_ratio']:.2f}x** |")
    lines += ["", "## The one-off cost", "",
              "`mmvssl shards add-features` end to end (read the shard, decode frames at 4 frames/s over each whole "
              "video straight at the teacher's size, run the teacher, write the new shard) on 4 procedural videos "
              "of 3 s:", "",
              "| teacher | samples | frames | wall s | frames / s (wall) | CPU s | frames / CPU s |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["add_features"]
        lines.append(f"| {r['teacher']} | {a['samples']} | {a['frames']} | {a['seconds']:.2f} | "
                     f"{a['frames_per_s']:.1f} | {a['cpu_seconds']:.2f} | {a['frames_per_cpu_s']:.1f} |")
    lines += ["", f"The loader's pairing of one sample's cached features with its frames (parse a member of 2 min at "
              f"4 frames/s, D = 512, pick the nearest cached time for 8 frames): {pairing_us:.0f} CPU us."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
