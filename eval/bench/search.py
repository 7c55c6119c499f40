"""Search benchmark (a script, not a test): index build throughput against `mmvssl extract`, query
latency and memory of exact against approximate search at 10k / 100k / 1M vectors, the
approximate index's recall@10, and 50 concurrent queries against `mmvssl serve` on loopback.

    .venv/bin/python eval/bench/search.py MODEL --shards SHARDS [--out docs/benchmarks/search.md] [--quick]

Build: `index build` of SHARDS (windows of the model's clip length, thumbnails, SQLite, faiss) in
windows/s, against `extract_features` (what `mmvssl extract` runs: one clip per sample, same model
input) in clips/s on the same shards in the same run. Vectors: synthetic unit embeddings (D = 128)
drawn around N / 100 random centres (noise norm 0.8 per vector: a point's cosine with its centre is
about 0.78, with another point of its cluster about 0.6, like neighbouring windows of one video),
200 held-out queries from the same mixture; and a structureless control (noise norm 2.0) where
clusters have dissolved and the exact neighbours are mostly there by chance. Latency is per single query, faiss on one thread; memory is
the serialised index size and the process's RSS growth while building it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mmvssl.search import store  # noqa: E402

D = 128


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def mixture(n: int, rng, centres: np.ndarray, noise: float) -> np.ndarray:
    """(n, D) unit vectors: a random centre plus Gaussian noise of norm ~`noise`, normalised."""
    x = centres[rng.integers(len(centres), size=n)] + rng.standard_normal((n, D)).astype(np.float32) * noise / np.sqrt(D)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def latencies(index, queries: np.ndarray) -> tuple[list[float], list[float]]:
    """Per single query: wall ms and this thread's CPU ms (steadier on a shared machine)."""
    wall, cpu = [], []
    for q in queries:
        t, c = time.perf_counter(), time.thread_time()
        index.search(q[None], 10)
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.thread_time() - c) * 1000)
    return wall, cpu


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p))


def bench_vectors(sizes: list[int], noise: float) -> list[dict]:
    import faiss
    threads = faiss.omp_get_max_threads()
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n)
        centres = rng.standard_normal((max(n // 100, 10), D)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x, queries = mixture(n, rng, centres, noise), mixture(200, rng, centres, noise)
        ids = np.arange(n, dtype=np.int64)
        truth = None
        for kind, threshold in (("flat (exact)", 10**12), ("ivf (approximate)", 0)):
            before = rss_mb()
            faiss.omp_set_num_threads(threads)  # building uses every core, queries one
            t = time.perf_counter()
            index = store.make_faiss_index(x, ids, threshold)
            build = time.perf_counter() - t
            grown = rss_mb() - before
            faiss.omp_set_num_threads(1)
            lat, cpu = latencies(index, queries)
            _, found = index.search(queries, 10)
            if truth is None:
                truth = found
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)]))
            rows.append({"n": n, "kind": kind, "build_s": build, "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
                         "cpu_p50_ms": pct(cpu, 50), "bytes_mb": len(faiss.serialize_index(index)) / 2**20, "rss_mb": grown, "recall": recall})
            print(rows[-1], file=sys.stderr)
            del index
    return rows


def bench_build(model: str, shards: str) -> dict:
    from mmvssl.evaluation.features import extract_features
    from mmvssl.models.presets import load_model
    from mmvssl.search.index import build_index
    extract_features(load_model(model), shards)  # warm-up (imports, caches), not timed
    t, c = time.perf_counter(), time.process_time()
    features = extract_features(load_model(model), shards)
    extract_s, extract_cpu = time.perf_counter() - t, time.process_time() - c
    with tempfile.TemporaryDirectory() as tmp:
        t, c = time.perf_counter(), time.process_time()
        counts = build_index(model, shards, str(Path(tmp) / "idx"))
        build_s, build_cpu = time.perf_counter() - t, time.process_time() - c
    return {"clips": len(features["keys"]), "extract_s": extract_s, "extract_cpu_s": extract_cpu,
            "windows": counts["windows"], "build_s": build_s, "build_cpu_s": build_cpu}


def bench_concurrent(model: str, shards: str, clients: int = 50) -> dict:
    from mmvssl.search.index import build_index
    from mmvssl.search.server import make_server
    with tempfile.TemporaryDirectory() as tmp:
        build_index(model, shards, str(Path(tmp) / "idx"))
        server = make_server(str(Path(tmp) / "idx"), port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/api/search?k=10&q="
        words = ["red circle", "blue square moving", "a green triangle bouncing", "a cyan ring", "yellow cross"]

        def one(i: int, out: list, barrier=None):
            if barrier:
                barrier.wait()
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(url + urllib.request.quote(words[i % len(words)]), timeout=120) as r:
                    ok = r.status == 200 and b'"results"' in r.read()
            except OSError:
                ok = False
            out.append((ok, (time.perf_counter() - t) * 1000))

        alone: list = []
        for i in range(20):
            one(i, alone)
        together: list = []
        barrier = threading.Barrier(clients)
        threads = [threading.Thread(target=one, args=(i, together, barrier)) for i in range(clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        server.shutdown()
        server.server_close()
    lat = [ms for _, ms in together]
    return {"clients": clients, "failed": sum(not ok for ok, _ in together), "wall_s": wall,
            "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "alone_p50_ms": pct([ms for _, ms in alone], 50)}


def write_markdown(out: Path, build: dict, vectors: list[dict], control: list[dict], conc: dict, cmd: str) -> None:
    import os
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    def table(rows: list[dict]) -> list[str]:
        lines = ["| vectors | index | build s | p50 ms | p95 ms | CPU p50 ms | CPU p50 vs flat | index MB | RSS growth MB "
                 "| recall@10 |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        flat = {r["n"]: r for r in rows if r["kind"].startswith("flat")}
        for r in rows:
            lines.append(f"| {r['n']:,} | {r['kind']} | {r['build_s']:.2f} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | "
                         f"{r['cpu_p50_ms']:.3f} | {r['cpu_p50_ms'] / flat[r['n']]['cpu_p50_ms']:.3f}x | "
                         f"{r['bytes_mb']:.1f} | {r['rss_mb']:.0f} | "
                         f"{r['recall']:.3f} |")
        return lines

    wps, cps = build["windows"] / build["build_s"], build["clips"] / build["extract_s"]
    wpc, cpc = build["windows"] / build["build_cpu_s"], build["clips"] / build["extract_cpu_s"]
    lines = ["# Search benchmark", "", f"Written by `{cmd}` (eval/bench/search.py); one run, numbers of this machine",
             f"(2 CPU cores shared with other jobs, load average {load}: wall times are noisy; CPU times and "
             "ratios within one run are steadier).", "",
             "## Index build against `mmvssl extract`", "",
             "| | items | wall s | items/s | vs extract | CPU s | items per CPU s | vs extract |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| `mmvssl extract` (baseline: one clip per sample) | {build['clips']} clips | {build['extract_s']:.1f} | "
             f"{cps:.1f} | 1.00x | {build['extract_cpu_s']:.1f} | {cpc:.1f} | 1.00x |",
             f"| `mmvssl index build` (windows, thumbnails, SQLite, faiss) | {build['windows']} windows | "
             f"{build['build_s']:.1f} | {wps:.1f} | {wps / cps:.2f}x | {build['build_cpu_s']:.1f} | {wpc:.1f} | "
             f"{wpc / cpc:.2f}x |", "",
             f"## Query latency, memory and recall (D = {D}, clustered synthetic embeddings, 200 queries, k = 10)", "",
             f"Exact search is a flat inner-product index; the approximate one is IVF with 2 sqrt(N) lists and "
             f"nprobe = max(32, lists / 16) (the defaults; `mmvssl index` switches to it at "
             f"{store.APPROX_THRESHOLD:,} vectors). Recall@10 is against the exact top 10; 'p50 vs flat' is "
             f"the baseline ratio at the same size.", "", *table(vectors), "",
             "Structureless control (noise norm 2.0: the clusters have dissolved and neighbours are nearly "
             "random; approximate search is weakest here):", "", *table(control), "",
             f"## {conc['clients']} concurrent text queries to `mmvssl serve` on loopback", "",
             "| | p50 ms | p95 ms | failed |", "|---|---:|---:|---:|",
             f"| one at a time (baseline, 20 queries) | {conc['alone_p50_ms']:.0f} | | |",
             f"| {conc['clients']} at once ({conc['wall_s']:.1f} s for all) | {conc['p50_ms']:.0f} | "
             f"{conc['p95_ms']:.0f} | {conc['failed']} of {conc['clients']} |", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--shards", required=True)
    ap.add_argument("--out", default="docs/benchmarks/search.md")
    ap.add_argument("--quick", action="store_true", help="10k and 100k vectors only")
    ap.add_argument("--sizes", default=None, help="comma-separated vector counts (overrides --quick)")
    args = ap.parse_args()
    sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    if args.sizes:
        sizes = [int(n) for n in args.sizes.split(",")]
    build = bench_build(args.model, args.shards)
    print(build, file=sys.stderr)
    conc = bench_concurrent(args.model, args.shards)
    print(conc, file=sys.stderr)
    vectors = bench_vectors(sizes, noise=0.8)
    control = bench_vectors(sizes[:2], noise=2.0)
    cmd = "python eval/bench/search.py " + " ".join(sys.argv[1:])
    write_markdown(Path(args.out), build, vectors, control, conc, cmd)
    print(f"wrote {args.out}", file=sys.stderr)
    if conc["failed"]:
        sys.exit(f"{conc['failed']} of {conc['clients']} concurrent queries failed")


if __name__ == "__main__":
    main()
