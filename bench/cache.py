"""Semantic cache benchmark: index search latency by size, and end-to-end Lookup over gRPC.

    python -m bench.cache [--sizes 10000 100000 1000000] [--concurrency 1 8 32] [--smoke] [--out PATH]

Search: a NamespaceIndex of N random unit vectors (384-dim, one partition), top-5 of single queries,
p50/p99 over --queries queries, on its exact path at every size (the int8-screened exact top-k kernel; the
graph the index uses from 50,000 rows is measured on question embeddings by bench/cache_scale.py); in the same run, a float32-only
pass of the same kernel and a numpy float32 scan (the previous implementation), and the time to read the
float32 matrix once at this machine's measured streaming-read bandwidth (the bound for any float32 scan). End to end: `strata serve cache` in a
subprocess on a private redis-server, --entries questions stored, then closed-loop Lookups of new
(paraphrased or unrelated) questions at each concurrency: latency p50/p99 and lookups/s (embedding,
micro-batching, search, decision and Redis reads included). JSON and PNG in bench/results/ (--out moves
both); --smoke: a seconds-long run at tiny sizes, the JSON only, to a temporary directory (bench/smoke.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import smoke
from bench.serving import machine_info
from bench.strata import free_port

DIM = 384
# (the 1M search target is bench/cache_scale.py's: from 50,000 rows the service searches a graph, not this exact path)
TARGETS = {"search_p99_ms_at_100000": 5.0, "lookups_per_s": 200.0}
_ROOT = Path(__file__).resolve().parent.parent
_PAIRS = _ROOT.parent / "shared" / "data" / "qqp_pairs_dev.jsonl"


def read_bandwidth_gb_s() -> float:
    """Bytes/s of one streaming read (np.sum over 256 MiB, well beyond the caches): an exact search
    reads the whole matrix once, so matrix bytes / this is its lower bound."""
    a = np.ones(256 * 2**20 // 4, np.float32)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return a.nbytes / min(times) / 1e9


def _latencies(fn, queries: np.ndarray) -> list[float]:
    fn(queries[0])
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench_search(sizes: list[int], num_queries: int, seed: int) -> list[dict]:
    import torch

    import kernels
    from services.cache.index import NamespaceIndex

    rng = np.random.default_rng(seed)
    out = []
    bw = read_bandwidth_gb_s()
    for n in sizes:
        idx = NamespaceIndex(DIM, initial_capacity=n, ann_min_rows=n + 1)   # the exact path: the graph is cache_scale's
        for start in range(0, n, 100_000):
            block = rng.standard_normal((min(100_000, n - start), DIM)).astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            idx.add_many([f"e{start + i}" for i in range(len(block))], ["p"] * len(block), [""] * len(block), block)
        queries = rng.standard_normal((num_queries, DIM)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        rows = idx._vectors[:n]   # the float32 matrix the index keeps next to its int8 codes

        def numpy_scan(q: np.ndarray) -> None:   # a float32 scan with numpy (the previous implementation)
            scores = rows @ q
            np.argpartition(-scores, 4)[:5]

        def f32_kernel(q: np.ndarray) -> None:   # the same kernel's float32-only pass
            kernels.cosine_topk_f32(torch.from_numpy(rows), torch.zeros(n, dtype=torch.int32),
                                    torch.from_numpy(q[None, :]), torch.zeros(1, dtype=torch.int32), 5)

        timed = {name: _latencies(fn, queries) for name, fn in
                 (("index", lambda q: idx.search(q, "p", 5)), ("f32_kernel", f32_kernel), ("numpy_f32", numpy_scan))}
        bound_ms = n * DIM * 4 / (bw * 1e9) * 1e3   # one read of the float32 matrix at streaming-read bandwidth
        r = {"entries": n, "p50_ms": float(np.percentile(timed["index"], 50)),
             "p99_ms": float(np.percentile(timed["index"], 99)), "matrix_read_bound_ms": bound_ms,
             "read_bandwidth_GB_s": bw}
        for name in ("f32_kernel", "numpy_f32"):
            r[f"{name}_p50_ms"] = float(np.percentile(timed[name], 50))
            r[f"{name}_p99_ms"] = float(np.percentile(timed[name], 99))
        r["speedup_p50_vs_numpy_f32"] = r["numpy_f32_p50_ms"] / r["p50_ms"]
        out.append(r)
        print(f"  search {n:>8} entries: p50 {r['p50_ms']:7.2f} ms, p99 {r['p99_ms']:7.2f} ms; float32 kernel p50 "
              f"{r['f32_kernel_p50_ms']:.2f} ms, numpy float32 p50 {r['numpy_f32_p50_ms']:.2f} ms (one read of the "
              f"float32 matrix at {bw:.1f} GB/s: {bound_ms:.2f} ms)", flush=True)
        del idx
    return out


def questions(n: int) -> tuple[list[str], list[str]]:
    """(stored, looked up): QQP pairs if the shared data is there, otherwise generated questions."""
    if _PAIRS.is_file():
        a, b = [], []
        with open(_PAIRS) as f:
            for line in f:
                d = json.loads(line)
                a.append(d["text_a"])
                b.append(d["text_b"])
                if len(a) >= n:
                    break
        return a, b
    topics = ["python", "rust", "the moon", "coffee", "taxes", "whales", "chess", "jazz", "bread", "volcanoes"]
    a = [f"What is the best way to learn about {topics[i % 10]} number {i}?" for i in range(n)]
    b = [f"How should I start learning {topics[i % 10]} topic {i}?" for i in range(n)]
    return a, b


async def wait_serving(port: int, service: str, log_path: Path, timeout_s: float = 120) -> None:
    """Until the server on `port` reports `service` SERVING; its log's tail in the error otherwise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        while time.monotonic() < deadline:
            try:
                r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(log_path.read_text()[-2000:])


def redis_server(port: int) -> subprocess.Popen:
    """A private redis-server on `port`, no persistence (bench.cache_scale starts its own with this too)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (make install installs it)")
    return subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)


class RedisAndCache:
    def __init__(self) -> None:
        self.redis_port, self.port = free_port(), free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="strata-cache-bench-", suffix=".log", delete=False)
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "RedisAndCache":
        self.procs.append(redis_server(self.redis_port))
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", "cache", "--port", str(self.port), "--redis-url",
             f"redis://127.0.0.1:{self.redis_port}/0"], cwd=_ROOT, stdout=self.log, stderr=subprocess.STDOUT))
        asyncio.run(self._wait())
        return self

    async def _wait(self) -> None:
        await wait_serving(self.port, "strata.v1.SemanticCache", Path(self.log.name))

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.log.close()
        os.unlink(self.log.name)


async def _e2e(port: int, stored: list[str], lookups: list[str], concurrency: list[int], per_level: int,
               repeat: int = 3) -> list[dict]:
    import grpc

    from services.common.pb import cache_pb2, cache_pb2_grpc, common_pb2

    def q(text: str) -> cache_pb2.CacheQuery:
        return cache_pb2.CacheQuery(namespace="bench", model="m", prompt=text,
                                    sampling=common_pb2.SamplingParams(temperature=0.0))

    out = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = cache_pb2_grpc.SemanticCacheStub(ch)
        for start in range(0, len(stored), 64):
            await asyncio.gather(*(stub.Store(cache_pb2.StoreRequest(query=q(t), answer=cache_pb2.CachedAnswer(text="a")))
                                   for t in stored[start:start + 64]))
        for c in concurrency:
            todo = iter(lookups[:per_level])
            lat: list[float] = []
            hits = 0

            async def worker() -> None:
                nonlocal hits
                for text in todo:   # closed loop: the next lookup as soon as the last one answered
                    t0 = time.perf_counter()
                    r = await stub.Lookup(cache_pb2.LookupRequest(query=q(text)))
                    lat.append((time.perf_counter() - t0) * 1e3)
                    hits += r.hit

            todo = iter(lookups[per_level:per_level + 2 * c])   # warm-up on other questions, same concurrency
            await asyncio.gather(*(worker() for _ in range(c)))
            runs = []
            for _ in range(repeat):
                todo = iter(lookups[:per_level])
                lat.clear()
                hits = 0
                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(c)))
                wall = time.perf_counter() - t0
                runs.append({"lookups_per_s": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50)),
                             "p99_ms": float(np.percentile(lat, 99)), "hit_rate": hits / len(lat)})
            mid = sorted(runs, key=lambda r: r["lookups_per_s"])[len(runs) // 2]   # the median run
            out.append({"concurrency": c, "lookups": per_level, **mid,
                        "runs_lookups_per_s": [r["lookups_per_s"] for r in runs]})
            print(f"  lookup c={c:<3}: {mid['lookups_per_s']:7.1f} lookups/s (median of {repeat}: "
                  f"{', '.join(f'{r:.0f}' for r in out[-1]['runs_lookups_per_s'])}), p50 {mid['p50_ms']:6.1f} ms, "
                  f"p99 {mid['p99_ms']:6.1f} ms", flush=True)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    s = result["search"]
    xs = [r["entries"] for r in s]
    a1.plot(xs, [r["p50_ms"] for r in s], "o-", label="p50")
    a1.plot(xs, [r["p99_ms"] for r in s], "o-", label="p99")
    if "numpy_f32_p50_ms" in s[0]:
        a1.plot(xs, [r["numpy_f32_p50_ms"] for r in s], "s:", color="gray", label="numpy float32 scan p50 (same run)")
    a1.plot(xs, [r["matrix_read_bound_ms"] for r in s], "k--", label="one read of the float32 matrix (measured read bandwidth)")
    a1.scatter([100_000, 1_000_000], [5, 25], marker="x", color="red", label="targets (p99)", zorder=3)
    a1.set(xscale="log", yscale="log", xlabel="entries in the namespace", ylabel="ms", title="exact top-5 search, 384-dim (int8-screened kernel)")
    a1.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=8)
    e = result["end_to_end"]
    cs = [r["concurrency"] for r in e]
    a2.bar([str(c) for c in cs], [r["lookups_per_s"] for r in e], color="tab:blue")
    a2.axhline(TARGETS["lookups_per_s"], color="red", ls="--", label="target")
    a2.set_ylim(0, 1.2 * max(TARGETS["lookups_per_s"], *(r["lookups_per_s"] for r in e)))   # room for the labels
    for i, r in enumerate(e):
        a2.annotate(f"p50 {r['p50_ms']:.0f} ms\np99 {r['p99_ms']:.0f} ms", (i, r["lookups_per_s"]), ha="center",
                    va="bottom", fontsize=8)
    a2.set(xlabel="concurrent callers", ylabel="lookups/s", title="end-to-end Lookup over gRPC (embed + search + Redis)")
    a2.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"Strata semantic cache — {m['cpu_count']} CPUs: {m['cpu_model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--entries", type=int, default=2000, help="questions stored before the end-to-end runs")
    p.add_argument("--lookups", type=int, default=400, help="lookups per concurrency level")
    p.add_argument("--repeat", type=int, default=3, help="end-to-end runs per concurrency (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    smoke.add_args(p, "cache")
    a = smoke.resolve(p.parse_args(argv), sizes=[1000], queries=10, concurrency=[1, 2], entries=20, lookups=10,
                      repeat=1)
    print("search latency", flush=True)
    search = bench_search(a.sizes, a.queries, a.seed)
    stored, looked_up = questions(max(a.entries, a.lookups + 2 * max(a.concurrency)))   # + warm-up questions
    print("end-to-end lookups", flush=True)
    with RedisAndCache() as svc:
        e2e = asyncio.run(_e2e(svc.port, stored[:a.entries], looked_up, a.concurrency, a.lookups, a.repeat))
    by_size = {r["entries"]: r["p99_ms"] for r in search}
    targets = {
        "search_p99_ms_at_100000": {"target": 5.0, "value": by_size.get(100_000)},
        "lookups_per_s": {"target": 200.0, "value": max(r["lookups_per_s"] for r in e2e)},
    }
    for name, t in targets.items():
        v = t["value"]
        t["met"] = None if v is None else (v >= t["target"] if name == "lookups_per_s" else v <= t["target"])
    result = {"config": {k: v for k, v in vars(a).items() if k != "out"}, "machine": machine_info(),
              "search": search, "end_to_end": e2e, "targets": targets}
    for name, t in targets.items():
        print(f"target {name}: {t['target']}, got {t['value'] if t['value'] is None else round(t['value'], 2)}: "
              f"{'n/a' if t['met'] is None else 'met' if t['met'] else 'MISSED'}")
    smoke.write(a, result, plot)


if __name__ == "__main__":
    main()
