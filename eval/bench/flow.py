"""Optical-flow benchmark (a script, not a test): how fast OpenCV computes dense flow on the CPU,
and what a training step costs with flow cached in shards (`shards add-flow`, `data.flow`)
against computing it online for every clip, in the same run.

    .venv/bin/python eval/bench/flow.py [--videos 4] [--size 112] [--frames 8] [--batch 4]
                                        [--repeats 3] [--out FILE.json]

Data: eval/bench/data.py's 10 s 640x360 H.264 videos (a moving texture and a moving square).

1. Flow rate: frames decoded at 8 frames/s with the short side `--size` (what add-flow decodes),
   then DIS (medium) and Farneback over consecutive frames: frames per CPU second of the flow
   alone, and of `add-flow` end to end (decode, flow, quantise, write the shard).
2. A training step of a flow stream: a batch of `--batch` clips of `--frames` frames at `--size`
   px, then forward + backward of a small flow encoder (r3d_18, 2 input channels). Cached: each
   clip's flow read from the shard member and paired with the clip (mmvssl.data.flow.pair_flow,
   what the loader runs). Online: each clip's frames (and the one after) decoded and DIS run
   between them, then the same crop/resize. Both variants alternate in one process with one
   torch thread; times are CPU seconds (the shared machine's wall times swing with its load), the
   best of the repeats, and the ratio is what to read.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eval.bench.data import make_web_video  # noqa: E402
from mmvssl.data.add_flow import add_flow  # noqa: E402
from mmvssl.data.decode import decode_window  # noqa: E402
from mmvssl.data.flow import MEMBER, FlowComputer, centre_box, crop_flow, pair_flow  # noqa: E402
from mmvssl.data.rawsample import read_shard  # noqa: E402
from mmvssl.models.video_cnn import TorchvisionVideoEncoder  # noqa: E402

CACHE_FPS = 8.0


def flow_rate(videos: list[bytes], size: int, algorithm: str) -> tuple[float, int]:
    """(CPU seconds of the flow alone, frames) over every video decoded at CACHE_FPS."""
    seconds, frames_n = 0.0, 0
    for data in videos:
        frames = decode_window(data, 0.0, int(10 * CACHE_FPS), CACHE_FPS, None, None, short_side=size).frames
        computer = FlowComputer(algorithm)
        tic = time.process_time()
        computer(frames)
        seconds += time.process_time() - tic
        frames_n += len(frames)
    return seconds, frames_n


def online_clip(data: bytes, start: float, frames: int, size: int) -> torch.Tensor:
    """(2, T, size, size): the clip's frames and the next one decoded, DIS between them, centre crop."""
    clip = decode_window(data, start, frames + 1, CACHE_FPS, None, None, short_side=size).frames
    forward = FlowComputer("dis")(clip)[1:]  # row i: frame i -> i + 1
    return crop_flow(torch.from_numpy(forward).permute(0, 3, 1, 2), centre_box(*forward.shape[1:3]), False,
                     size).transpose(0, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import cv2
    cv2.setNumThreads(1)
    result: dict = {"videos": args.videos, "size": args.size, "frames": args.frames, "batch": args.batch,
                    "repeats": args.repeats, "cache_fps": CACHE_FPS}
    with tempfile.TemporaryDirectory() as tmp:
        import webdataset as wds
        shards = Path(tmp) / "in"
        shards.mkdir()
        videos = []
        with wds.TarWriter(str(shards / "shard-000000.tar"), encoder=False) as w:
            for i in range(args.videos):
                path = Path(tmp) / f"{i}.mp4"
                make_web_video(path, seed=i)
                videos.append(path.read_bytes())
                w.write({"__key__": f"{i:06d}", "mp4": videos[-1], "json": json.dumps({"duration": 10.0}).encode()})
        # 1. flow rate, and add-flow end to end
        for algorithm in ("dis", "farneback"):
            seconds, n = flow_rate(videos, args.size, algorithm)
            result[f"{algorithm}_frames_per_cpu_s"] = n / seconds
        tic = time.process_time()
        report = add_flow(str(shards), Path(tmp) / "out", fps=CACHE_FPS, size=args.size, progress=False)
        total = sum(r["frames"] for r in report["shards"].values())
        result["add_flow_frames_per_cpu_s"] = total / (time.process_time() - tic)
        cached = list(read_shard(str(Path(tmp) / "out" / "shard-000000.tar")))
        result["member_bytes_per_video"] = float(np.mean([len(r[MEMBER]) for r in cached]))
        # 2. a flow-stream training step: cached vs online
        encoder = TorchvisionVideoEncoder("r3d_18", num_frames=args.frames, image_size=args.size, in_channels=2)
        optimizer = torch.optim.SGD(encoder.parameters(), lr=0.01)
        window = args.frames / CACHE_FPS

        def step(online: bool, rng: random.Random) -> tuple[float, float]:
            tic = time.process_time()
            clips = []
            for _ in range(args.batch):
                i = rng.randrange(len(videos))
                start = rng.uniform(0.0, 10.0 - window - 1.0 / CACHE_FPS)
                if online:
                    clips.append(online_clip(videos[i], start, args.frames, args.size))
                else:
                    times = torch.from_numpy(start + np.arange(args.frames) / CACHE_FPS)
                    clips.append(pair_flow(cached[i], times, None, False, args.size))
            data_s = time.process_time() - tic
            loss = encoder(torch.stack(clips))["pooled"].pow(2).mean()  # (B, 2, T, H, W) in
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return data_s, time.process_time() - tic

        seconds = {"cached": [], "online": []}
        data_seconds = {"cached": [], "online": []}
        for repeat in range(args.repeats):
            for name in (("cached", "online") if repeat % 2 == 0 else ("online", "cached")):
                data_s, step_s = step(name == "online", random.Random(repeat))
                seconds[name].append(step_s)
                data_seconds[name].append(data_s)
    best = {k: min(v) for k, v in seconds.items()}
    result.update({"step_cpu_s": best, "flow_input_cpu_s": {k: min(v) for k, v in data_seconds.items()},
                   "step_speedup_cached": best["online"] / best["cached"]})
    print(f"flow at {args.size}px short side: DIS {result['dis_frames_per_cpu_s']:.1f} frames per CPU s, "
          f"Farneback {result['farneback_frames_per_cpu_s']:.1f}; add-flow end to end (DIS) "
          f"{result['add_flow_frames_per_cpu_s']:.1f} frames per CPU s, "
          f"{result['member_bytes_per_video'] / 1e6:.2f} MB per 10 s video")
    print(f"flow-stream step ({args.batch} clips x {args.frames} frames at {args.size}px, r3d_18): cached "
          f"{best['cached']:.3f} CPU s (flow input {result['flow_input_cpu_s']['cached']:.3f}), online "
          f"{best['online']:.3f} (flow input {result['flow_input_cpu_s']['online']:.3f}): "
          f"{result['step_speedup_cached']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
