"""Gateway benchmark: the cache-hit path through the gateway versus calling the cache directly.

    python -m bench.gateway [--rate 500] [--seconds 8] [--concurrency 64] [--repeats 3] [--smoke] [--out PATH]

redis-server, `strata serve cache` and `strata serve gateway` run as subprocesses on private ports;
one API key without limits; --questions questions are stored in the cache under the key's tenant, so
every request is an exact hit (no model call), and each is sent through the gateway once before timing
(as when it was first asked; the default injection screen then knows its score). Per repeat:
- open loop at --rate requests/s for --seconds: the cache's Lookup called directly, then the gateway's
  Generate for the same questions; latency p50/p99 of each, added latency = gateway - direct;
- closed loop with --concurrency callers through the gateway: the sustained rate.
The services trace --trace-sample of the requests (default 1%; tracing every one costs the gateway
about a fifth of its rate here). Medians over --repeats; JSON + PNG in bench/results/ (--out moves both). The client runs on the same machine, on the
services' event loop (uvloop where installed; STRATA_EVENT_LOOP=asyncio for the standard one).
--smoke: a seconds-long run at tiny sizes, the JSON only, to a temporary directory (bench/smoke.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.cache import RedisAndCache, questions, wait_serving
from bench import smoke
from bench.serving import machine_info
from bench.strata import free_port
from services.common import aio

MODEL = "SmolLM2-135M-Instruct"
ADMIN, PEPPER = "bench-admin-token", "bench-pepper-0123456789abcdef"
TARGETS = {"added_p50_ms": 2.0, "added_p99_ms": 10.0, "sustained_rps": 1000.0}
_ROOT = Path(__file__).resolve().parent.parent


class Gateway:
    def __init__(self, redis_port: int, cache_port: int) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "services.cli", "serve", "gateway", "--port", str(self.port),
                     "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--cache", f"127.0.0.1:{cache_port}",
                     "--router", f"127.0.0.1:{free_port()}",          # never called: every request is a hit
                     "--http-port", "-1",                               # the gRPC path is what is measured
                     "--plaintext"]                                     # a local run: no certificates
        self.log = tempfile.NamedTemporaryFile("w+", prefix="strata-gateway-bench-", suffix=".log", delete=False)

    def __enter__(self) -> "Gateway":
        env = {**os.environ, "STRATA_KEY_PEPPER": PEPPER, "STRATA_ADMIN_TOKEN": ADMIN}
        self.proc = subprocess.Popen(self.args, cwd=_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        asyncio.run(wait_serving(self.port, "strata.v1.Gateway", Path(self.log.name)))
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        os.unlink(self.log.name)


def _pct(lat: list[float]) -> dict:
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "n": len(lat)}


async def _open_loop(send, items: list, rate: float, seconds: float) -> dict:
    """Requests start on schedule (every 1/rate s) whether or not earlier ones finished."""
    n = int(rate * seconds)
    lat: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05

    async def one(i: int) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
        start = time.perf_counter()
        try:
            await send(items[i % len(items)])
            lat.append((time.perf_counter() - start) * 1e3)
        except Exception:  # noqa: BLE001 - counted, reported
            errors += 1
    await asyncio.gather(*(one(i) for i in range(n)))
    achieved = n / (loop.time() - t0)
    return {**_pct(lat), "errors": errors, "offered_rps": rate, "achieved_rps": achieved}


async def _closed_loop(send, items: list, concurrency: int, total: int) -> float:
    todo = iter(range(total))

    async def worker() -> None:
        for i in todo:
            await send(items[i % len(items)])
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - t0)


async def run(cache_port: int, gw_port: int, a: argparse.Namespace) -> dict:
    import grpc

    from services.common.pb import cache_pb2, cache_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc

    stored, _ = questions(a.questions)
    md = (("authorization", f"Bearer {ADMIN}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cache_port}") as cch, \
            grpc.aio.insecure_channel(f"127.0.0.1:{gw_port}") as gch:
        cache, gw = cache_pb2_grpc.SemanticCacheStub(cch), gateway_pb2_grpc.GatewayStub(gch)
        admin = gateway_pb2_grpc.GatewayAdminStub(gch)
        key = (await admin.CreateKey(gateway_pb2.CreateKeyRequest(tenant="bench"), metadata=md)).key
        auth = (("authorization", f"Bearer {key}"),)
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=16)

        def query(text: str) -> cache_pb2.CacheQuery:
            return cache_pb2.CacheQuery(namespace="bench", model=MODEL, sampling=sampling,
                                        messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=text)]))
        for i in range(0, len(stored), 64):
            await asyncio.gather(*(cache.Store(cache_pb2.StoreRequest(query=query(t), answer=cache_pb2.CachedAnswer(
                text="A cached answer of a few words.", finish_reason=common_pb2.FINISH_REASON_STOP)))
                for t in stored[i:i + 64]))
        lookups = [cache_pb2.LookupRequest(query=query(t)) for t in stored]
        requests = [gateway_pb2.GatewayRequest(model=MODEL, sampling=sampling, messages=query(t).messages) for t in stored]

        async def direct(r) -> None:
            resp = await cache.Lookup(r, timeout=10)
            assert resp.hit, "the benchmark's questions must all be cache hits"

        async def through(r) -> None:
            resp = await gw.Generate(r, metadata=auth, timeout=10)
            assert resp.source.kind == common_pb2.Source.KIND_CACHE_EXACT, "expected a cache hit"

        # warm-up; every question once through the gateway, as when it was first asked there (its
        # injection-similarity score is then known and a repeat costs no embedding)
        await _closed_loop(direct, lookups, 8, 200)
        await _closed_loop(through, requests, 8, len(requests))
        await _open_loop(direct, lookups, a.rate, min(1.0, a.seconds))
        await _open_loop(through, requests, a.rate, min(1.0, a.seconds))
        runs = []
        for r in range(a.repeats):
            d = await _open_loop(direct, lookups, a.rate, a.seconds)
            g = await _open_loop(through, requests, a.rate, a.seconds)
            sustained = await _closed_loop(through, requests, a.concurrency, int(a.rate * a.seconds))
            runs.append({"direct": d, "gateway": g, "added_p50_ms": g["p50_ms"] - d["p50_ms"],
                         "added_p99_ms": g["p99_ms"] - d["p99_ms"], "sustained_rps": sustained})
            print(f"  run {r + 1}: direct p50/p99 {d['p50_ms']:.2f}/{d['p99_ms']:.2f} ms, gateway "
                  f"{g['p50_ms']:.2f}/{g['p99_ms']:.2f} ms (achieved {g['achieved_rps']:.0f} of {a.rate:.0f} rps), "
                  f"sustained {sustained:.0f} rps at c={a.concurrency}", flush=True)
    med = {k: float(np.median([r[k] for r in runs])) for k in ("added_p50_ms", "added_p99_ms", "sustained_rps")}
    return {"runs": runs, "median": med}


def _event_loop() -> str:
    """What aio.run picks for the services and this client."""
    choice = os.environ.get("STRATA_EVENT_LOOP") or "auto"
    if choice == "asyncio":
        return choice
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    runs = result["runs"]
    for i, (name, color) in enumerate((("direct", "tab:gray"), ("gateway", "tab:blue"))):
        p50 = np.median([r[name]["p50_ms"] for r in runs])
        p99 = np.median([r[name]["p99_ms"] for r in runs])
        a1.bar([i * 3, i * 3 + 1], [p50, p99], color=color, label=f"{name} (p50, p99)")
    a1.set_xticks([0.5, 3.5], ["cache Lookup directly", "through the gateway"])
    a1.set(ylabel="ms", title=f"cache-hit latency at {result['config']['rate']:.0f} requests/s (open loop)")
    a1.legend(fontsize=8)
    a2.bar(["sustained"], [result["median"]["sustained_rps"]], color="tab:blue")
    a2.axhline(TARGETS["sustained_rps"], color="red", ls="--", label="target")
    a2.set(ylabel="requests/s", title=f"gateway cache hits, {result['config']['concurrency']} callers")
    a2.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"Strata gateway — {m['cpu_count']} CPUs: {m['cpu_model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--questions", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    smoke.add_args(p, "gateway")
    p.add_argument("--trace-sample", type=float, default=0.01,
                   help="fraction of requests the services trace (to a temporary JSON-lines file)")
    a = smoke.resolve(p.parse_args(argv), rate=50.0, seconds=0.5, concurrency=4, questions=20, repeats=1)
    # the services (subprocesses) sample traces as a busy deployment would; spans go to a scratch file
    os.environ.setdefault("STRATA_TRACE_FILE", os.path.join(tempfile.mkdtemp(prefix="strata-bench-"), "traces.jsonl"))
    os.environ.setdefault("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    os.environ.setdefault("OTEL_TRACES_SAMPLER_ARG", str(a.trace_sample))
    with RedisAndCache() as svc, Gateway(svc.redis_port, svc.port) as gw:
        res = aio.run(run(svc.port, gw.port, a))       # the services' event loop (uvloop where installed)
    targets = {}
    for name, target in TARGETS.items():
        v = res["median"][name]
        targets[name] = {"target": target, "value": v, "met": v >= target if name == "sustained_rps" else v <= target}
    result = {"config": {**{k: v for k, v in vars(a).items() if k != "out"}, "event_loop": _event_loop(),
                         "traces": {k: os.environ[k] for k in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")}},
              "machine": machine_info(), **res,
              "targets": targets}
    for name, t in targets.items():
        print(f"target {name}: {t['target']}, got {t['value']:.2f}: {'met' if t['met'] else 'MISSED'}")
    smoke.write(a, result, plot)


if __name__ == "__main__":
    main()
