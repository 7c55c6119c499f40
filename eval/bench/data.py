"""Data loading benchmark (a script, not a test): clips/s of the mmvssl loader against a naive
loader and against the decoder alone, PyAV vs torchcodec for the window decode, and worker
memory over 10,000 samples.

    .venv/bin/python eval/bench/data.py [--out docs/benchmarks/data.json] [--quick]

Data: shards of 10 s 640x360 H.264 videos (30 fps, a keyframe every 2 s) with AAC stereo audio
at 44.1 kHz, generated here. A clip: 16 frames spanning 2 s (8 fps) at 112^2 or 224^2 and the
same 2 s of audio at 16 kHz mono.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mmvssl.data.decode import decode_all, decode_window  # noqa: E402
from mmvssl.data.loader import DecodeSamples, SampleSpec, build_dataset  # noqa: E402
from mmvssl.data.sampling import random_window  # noqa: E402
from mmvssl.data.shards import build_shards  # noqa: E402


def make_web_video(path: Path, seconds: float = 10.0, size=(640, 360), fps: int = 30, seed: int = 0) -> None:
    """Smooth moving texture + a moving square; H.264 (gop 2 s) + AAC stereo 44.1 kHz."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    base = np.kron(base, np.ones((8, 8, 1), np.uint8))
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt, vs.gop_size = w, h, "yuv420p", 2 * fps
        vs.options = {"preset": "veryfast", "crf": "23", "keyint_min": str(2 * fps), "sc_threshold": "0"}
        a = out.add_stream("aac", rate=44100)
        a.layout = "stereo"
        n = int(seconds * fps)
        for i in range(n):
            img = np.ascontiguousarray(np.roll(base, i * 2, axis=1)[:h, :w])
            x = (i * 7) % (w - 60)
            img[100:160, x:x + 60] = (255, 255, 0)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
        t = np.arange(int(seconds * 44100)) / 44100
        wave = (0.3 * np.sin(2 * np.pi * (220 + 20 * seed) * t)).astype(np.float32)
        planes = np.stack([wave, wave])
        for s in range(0, planes.shape[1], 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes[:, s:s + 1024]), format="fltp", layout="stereo")
            f.sample_rate, f.pts = 44100, s
            for p in a.encode(f):
                out.mux(p)
        for p in a.encode():
            out.mux(p)


class NaiveDecodeSamples(DecodeSamples):
    """The naive loader: decode the whole video (every frame, full size) and all its audio,
    then pick the window's frames and resize them."""

    def decode(self, raw, rng):
        spec = self.spec
        frames, times, audio = decode_all(raw["mp4"], size=None, audio_rate=spec.audio_rate)
        duration = float(json.loads(raw["json"])["duration"])
        start = random_window(duration, spec.window, rng)
        picks = [max(0, np.searchsorted(times, start + i / spec.fps + 1e-6) - 1) for i in range(spec.num_frames)]
        video = torch.from_numpy(frames[picks]).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
        video = torch.nn.functional.interpolate(video, size=(spec.size, spec.size), mode="bilinear", antialias=True)
        lo = int(start * spec.audio_rate)
        clip_audio = torch.from_numpy(audio[lo:lo + spec.audio_samples].copy())
        return {"video": video.clamp(0, 255).byte().permute(1, 0, 2, 3),  # uint8 (C, T, H, W), as DecodeSamples
                "audio": torch.nn.functional.pad(clip_audio, (0, spec.audio_samples - len(clip_audio))),
                "text": torch.zeros(spec.num_candidates, spec.context_length, dtype=torch.long),
                "text_mask": torch.zeros(spec.num_candidates, dtype=torch.bool), "has_video": True,
                "has_audio": True, "has_text": False, "key": raw["__key__"], "meta": {}}


def loader_rate(shards: str, spec: SampleSpec, workers: int, batches: int, naive: bool = False,
                batch_size: int = 8, cpu_out: bool = False):
    """Clips per second of wall time; with cpu_out (workers=0 only), also per second of this
    process's CPU time, which other load on a shared machine barely moves."""
    dataset = build_dataset(shards, spec, batch_size, shuffle_buffer=16, num_workers=workers)
    if naive:
        stages = dataset.pipeline
        i = next(k for k, s in enumerate(stages) if isinstance(s, DecodeSamples))
        stages[i] = NaiveDecodeSamples(spec, 1.0, stages[i].position)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    it = iter(loader)
    for _ in range(max(1 if naive else 2, workers * 2)):  # warm-up: workers started, first batches out
        next(it)
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    clips = batches * batch_size
    wall_rate, cpu_rate = clips / (time.perf_counter() - t), clips / (time.process_time() - cpu)
    del it
    return (wall_rate, cpu_rate) if cpu_out else wall_rate


def decoder_rate(videos: list[bytes], spec: SampleSpec, n: int, library: str = "pyav") -> tuple[float, float]:
    """The decoder alone, in this process: exactly the window's frames (resized) and its audio.
    (clips per wall second, clips per CPU second)."""
    rng = random.Random(0)
    jobs = [(videos[i % len(videos)], random_window(10.0, spec.window, rng)) for i in range(n)]
    t, cpu = time.perf_counter(), time.process_time()
    for data, start in jobs:
        if library == "pyav":
            decode_window(data, start, spec.num_frames, spec.fps, spec.size, spec.audio_rate)
        else:
            _torchcodec_window(data, start, spec)
    return n / (time.perf_counter() - t), n / (time.process_time() - cpu)


def _torchcodec_window(data: bytes, start: float, spec: SampleSpec):
    from torchcodec.decoders import AudioDecoder, VideoDecoder
    from torchcodec.transforms import Resize
    video = VideoDecoder(data, seek_mode="approximate", transforms=[Resize((spec.size, spec.size))])
    frames = video.get_frames_played_at([start + i / spec.fps for i in range(spec.num_frames)]).data
    audio = AudioDecoder(data, sample_rate=spec.audio_rate, num_channels=1)
    wave = audio.get_samples_played_in_range(start, start + spec.window).data
    return frames, wave


def worker_memory(shards: str, samples: int) -> list[dict]:
    """RSS of the single DataLoader worker every 1,000 samples (small clips, batch 10)."""
    import psutil
    spec = SampleSpec(num_frames=4, fps=4.0, size=32, audio_rate=8000, context_length=16, train=True)
    loader = torch.utils.data.DataLoader(build_dataset(shards, spec, 10, shuffle_buffer=16, num_workers=1),
                                         batch_size=None, num_workers=1)
    it = iter(loader)
    children = psutil.Process().children(recursive=True)
    trace, seen = [], 0
    t = time.perf_counter()
    while seen < samples:
        seen += len(next(it)["key"])
        if seen % 1000 == 0:
            rss = sum(c.memory_info().rss for c in children if c.is_running()) / 2**20
            trace.append({"samples": seen, "worker_rss_mib": round(rss, 1), "s": round(time.perf_counter() - t, 1)})
    del it
    return trace


def reexec_with_pyav_ffmpeg() -> None:
    """torchcodec links against system FFmpeg (libavutil.so.N), which this machine lacks; PyAV's
    wheel carries FFmpeg 8 under hashed names. Expose those under their plain sonames and
    restart with LD_LIBRARY_PATH pointing there (read only at process start)."""
    if os.environ.get("MMVSSL_BENCH_SHIM"):
        return
    import re
    libs = Path(av.__file__).resolve().parent.parent / "av.libs"
    shim = Path(tempfile.mkdtemp(prefix="ffshim-"))
    for f in libs.iterdir():
        (shim / f.name).symlink_to(f)  # keeps the libraries' $ORIGIN lookups working
        m = re.match(r"(lib(?:av|sw)\w+)-[0-9a-f]{8}\.so\.(\d+)", f.name)
        if m:
            (shim / f"{m.group(1)}.so.{m.group(2)}").symlink_to(f)
    env = {**os.environ, "MMVSSL_BENCH_SHIM": str(shim),
           "LD_LIBRARY_PATH": f"{shim}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    reexec_with_pyav_ffmpeg()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8, help="timed batches of 8 clips per loader run")
    parser.add_argument("--sizes", default="112,224")
    parser.add_argument("--memory-samples", type=int, default=10000)
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    parser.add_argument("--quick", action="store_true", help="fewer videos and batches, 2,000 memory samples")
    args = parser.parse_args()
    if args.quick:
        args.videos, args.batches, args.memory_samples = 6, 4, 2000
    torch.set_num_threads(1)
    started = time.perf_counter()
    results: dict = {"cpu_count": os.cpu_count(), "pyav": av.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        (tmp / "videos").mkdir()
        for i in range(args.videos):
            make_web_video(tmp / "videos" / f"{i:03d}.mp4", seed=i)
        build_shards(tmp / "videos", tmp / "shards", samples_per_shard=4)
        small = tmp / "small"
        small.mkdir()
        for i in range(4):
            make_web_video(small / f"{i}.mp4", size=(160, 90), seed=i)
        build_shards(small, tmp / "small_shards", samples_per_shard=2)
        print(f"generated {args.videos} videos in {time.perf_counter() - t:.1f}s", flush=True)
        videos = [p.read_bytes() for p in sorted((tmp / "videos").glob("*.mp4"))]
        shards = str(tmp / "shards")
        for size in [int(x) for x in args.sizes.split(",")]:
            spec = SampleSpec(num_frames=16, fps=8.0, size=size, audio_rate=16000, context_length=32, train=True)
            n = args.batches * 8
            # the two numbers of ratio (b) are taken alternately, best of two, so that load from
            # other processes on a shared machine hits both alike
            row = {"decoder_pyav": 0.0, "loader_w0": 0.0, "decoder_pyav_cpu": 0.0, "loader_w0_cpu": 0.0}
            for _ in range(2):
                wall, cpu = decoder_rate(videos, spec, n)
                row["decoder_pyav"], row["decoder_pyav_cpu"] = max(row["decoder_pyav"], wall), max(row["decoder_pyav_cpu"], cpu)
                wall, cpu = loader_rate(shards, spec, 0, args.batches, cpu_out=True)
                row["loader_w0"], row["loader_w0_cpu"] = max(row["loader_w0"], wall), max(row["loader_w0_cpu"], cpu)
            row["decoder_torchcodec"], row["decoder_torchcodec_cpu"] = decoder_rate(videos, spec, n, "tc")
            for workers in (0, 1, 2):
                if workers:
                    row[f"loader_w{workers}"] = loader_rate(shards, spec, workers, args.batches)
                row[f"naive_w{workers}"] = loader_rate(shards, spec, workers, 2, naive=True, batch_size=4)
                row[f"speedup_vs_naive_w{workers}"] = row[f"loader_w{workers}"] / row[f"naive_w{workers}"]
            row["loader_vs_decoder_alone_w0"] = row["loader_w0"] / row["decoder_pyav"]
            row["loader_vs_decoder_alone_w0_cpu"] = row["loader_w0_cpu"] / row["decoder_pyav_cpu"]
            results[f"{size}px"] = {k: round(v, 2) for k, v in row.items()}
            print(f"{size}px: " + ", ".join(f"{k} {v:.2f}" for k, v in results[f"{size}px"].items()), flush=True)
        results["memory"] = worker_memory(str(tmp / "small_shards"), args.memory_samples)
        print("worker RSS (MiB):", [m["worker_rss_mib"] for m in results["memory"]], flush=True)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"total {results['wall_s']}s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
