"""Hardening report: the whole suite under load, overload and faults, on loopback.

    python -m bench.hardening [--clients 200] [--soak-s 360] [--rates 2,4,8,16,32,64] [--rate-s 20]
                              [--fault-clients 40] [--phases soak,backpressure,faults] [--smoke]

The suite runs as `strata up` starts it (services/up.py's plan on free ports): redis-server, two inference
replicas, the cache, the router and the gateway, each its own process. Redis keeps an append-only file
fsynced on every write, as a production Redis would, so a Redis restart keeps keys and usage. Replicas
run one torch thread each (two replicas on a 2-core machine) and queue at most --max-queued requests.

Callers are gRPC streaming clients of the gateway (GenerateStream, greedy, 8 to 24 tokens, a deadline of
--deadline-s). A quarter of the prompts repeat (cache hits after their first answer), the rest are unique.
A caller that is refused backs off as a client should (retry-after on RESOURCE_EXHAUSTED, 0.2 s after
UNAVAILABLE). Every call ends with an answer or a status; a call still open 10 s past its deadline is
counted as hung (and cancelled).

Phases:
- soak: --clients callers for --soak-s; each service's RSS every 2 s (growth after warm-up reported, and
  judged flat or not for soaks of 5 minutes or more).
- backpressure: open loop, --rate-s at each offered rate: goodput (answers per second), latency of
  answers, how many were refused and how fast.
- faults, under --fault-clients callers: an inference replica killed (SIGKILL) and restarted, Redis killed
  and restarted, the cache service killed and restarted, the router killed and restarted; outcomes per
  second, the router's circuit state for the killed replica, which replica answered.
After each phase, once idle: every replica's KV blocks free and nothing running or waiting (Prometheus
metrics), nothing in flight in the gateway or router. The usage the gateway counted for the fault phase's
key is compared with the answers its callers received (the target: equal, nothing lost, nothing twice).

JSON + PNG in bench/results/hardening.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench import smoke
from services.common.retry_after import retry_after_s
from services.gateway.usage import utc_day
from services.up import Suite

MODEL = "SmolLM2-135M-Instruct"
ADMIN, PEPPER = "hardening-admin-token", "hardening-pepper-0123456789abcdef"
REPEATED = [f"In one sentence, what is {w}?" for w in (
    "a lighthouse", "photosynthesis", "a prime number", "a glacier", "an index in a database", "a violin",
    "the tide", "a compiler", "a volcano", "a sonnet", "a comet", "an antibody", "a rainbow", "a bridge",
    "a hash table", "a desert", "a vaccine", "a river delta", "a market", "a telescope")]
TOPICS = ["gardening", "sailing", "baking bread", "chess openings", "bird migration", "bicycle repair", "jazz",
          "tea", "volcanoes", "sorting algorithms", "the moon", "maps", "bees", "knots", "rainforests", "clocks"]
BAD_CODES = {"UNKNOWN", "INTERNAL", "DATA_LOSS", "HUNG"}   # never acceptable


# ---- the suite, as processes

class Cluster:
    """`strata up`'s children on free ports; kill and restart any of them by name."""

    def __init__(self, run_dir: Path, max_queued: int, gateway_max_in_flight: int, circuit_cooldown_s: float,
                 replicas: int = 2, gateway_args: tuple[str, ...] = ()) -> None:
        os.environ.setdefault("STRATA_KEY_PEPPER", PEPPER)
        os.environ.setdefault("STRATA_ADMIN_TOKEN", ADMIN)
        a = argparse.Namespace(models_file=None, models="SmolLM2-135M-Instruct", replicas=replicas, redis_url="",
                               host="127.0.0.1", free_ports=True, run_dir=run_dir, startup_timeout=600.0, quiet=True,
                               dtype=None)
        self.suite = Suite(a)
        self.admin_token = self.suite.env["STRATA_ADMIN_TOKEN"]
        for c in self.suite.children:
            if c.kind == "redis":          # durable, as in production: a restart keeps keys and usage
                i = c.args.index("--appendonly")
                c.args[i + 1] = "yes"
                c.args += ["--appendfsync", "always", "--dir", str(run_dir)]
            elif c.kind == "inference":
                c.args += ["--threads", "1", "--max-queued-requests", str(max_queued)]
            elif c.kind == "gateway":
                c.args += ["--max-in-flight", str(gateway_max_in_flight), *gateway_args]
            elif c.kind == "router":
                c.args += ["--open-cooldown-s", str(circuit_cooldown_s)]
        self.by_name = {c.name: c for c in self.suite.children}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.by_name[name].port}"

    async def start(self) -> None:
        self.suite.run_dir.mkdir(parents=True, exist_ok=True)
        for c in self.suite.children:
            self.suite.start(c)
        deadline = time.monotonic() + self.suite.a.startup_timeout
        for c in self.suite.children:
            await self.suite.wait_ready(c, deadline)

    def kill(self, name: str) -> None:
        c = self.by_name[name]
        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait()

    async def restart(self, name: str) -> None:
        c = self.by_name[name]
        self.suite.start(c)
        await self.suite.wait_ready(c, time.monotonic() + 300)

    def stop(self) -> None:
        self.suite.stop()

    def rss_mib(self) -> dict[str, float]:
        out = {}
        for c in self.suite.children:
            if c.proc is None or c.proc.poll() is not None:
                continue
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{c.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[c.name] = int(line.split()[1]) / 1024
        return out

    def metrics(self, name: str) -> dict[tuple[str, tuple], float]:
        """The service's Prometheus samples: {(name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        port = self.by_name[name].metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sample(m: dict, name: str, **labels) -> float | None:
    return m.get((name, tuple(sorted(labels.items()))))


def end_state(cluster: Cluster) -> dict:
    """What is still held: per replica KV blocks in use, running, waiting; gateway and router in flight."""
    out = {}
    for c in cluster.suite.children:
        if c.kind == "inference":
            m = cluster.metrics(c.name)
            out[c.name] = {"kv_usage": _sample(m, "strata:kv_cache_usage_perc"),
                           "running": _sample(m, "strata:num_requests_running"),
                           "waiting": _sample(m, "strata:num_requests_waiting")}
    out["gateway_in_flight"] = _sample(cluster.metrics("gateway"), "strata:gateway_in_flight")
    router = cluster.metrics("router")
    out["router_in_flight"] = sum(v for (n, _), v in router.items() if n == "strata:backend_in_flight")
    return out


def idle(state: dict) -> bool:
    reps = [v for k, v in state.items() if k.startswith("inference")]
    return (all(r["kv_usage"] == 0 and r["running"] == 0 and r["waiting"] == 0 for r in reps)
            and state["gateway_in_flight"] == 0 and state["router_in_flight"] == 0)


async def settle(cluster: Cluster, timeout_s: float = 60.0) -> dict:
    """Wait (up to timeout_s) until nothing is held; the final state either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = await asyncio.to_thread(end_state, cluster)
        if idle(state) or time.monotonic() > deadline:
            return {**state, "idle": idle(state)}
        await asyncio.sleep(0.5)


# ---- callers

@dataclass(slots=True)
class Outcome:
    t0: float                   # seconds since the phase began
    t1: float
    code: str                   # OK, a gRPC status name, or HUNG
    chunks: int = 0
    tokens: int = 0
    first_chunk_s: float | None = None
    source: str = ""            # model, cache_exact, cache_semantic
    replica: str = ""
    retry_after_s: float | None = None
    usage_tokens: int = 0       # completion tokens the final chunk reports
    refused_by: str = ""        # RESOURCE_EXHAUSTED: "gateway" (its in-flight cap) or "replicas" (queues full)


class Load:
    def __init__(self, gateway: str, key: str, deadline_s: float, seed: int, bypass_cache: bool = False) -> None:
        import grpc

        from services.common.pb import gateway_pb2_grpc
        self.channel = grpc.aio.insecure_channel(gateway, options=[("grpc.max_concurrent_streams", 1000)])
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.auth = (("authorization", f"Bearer {key}"),)
        self.deadline_s = deadline_s
        self.rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.t_start = time.monotonic()
        self.stopping = False       # callers finish the call they are in, then stop
        self.bypass_cache = bypass_cache
        self.max_tokens = (8, 24)   # answer lengths drawn per call; the replica-kill window asks for longer ones
        self.ignore_eos = False     # True: every answer runs to its max_tokens (the limit probes)

    def request(self):
        from services.common.pb import common_pb2, gateway_pb2

        if self.rng.random() < 0.25:
            text = self.rng.choice(REPEATED)
        else:
            text = f"Give me one tip about {self.rng.choice(TOPICS)} (note {uuid.uuid4().hex[:8]})."
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=self.rng.randint(*self.max_tokens),
                                             ignore_eos=self.ignore_eos)
        return gateway_pb2.GatewayRequest(model=MODEL, sampling=sampling, messages=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role="user", content=text)]),
            cache_policy=common_pb2.CACHE_POLICY_BYPASS if self.bypass_cache else common_pb2.CACHE_POLICY_UNSPECIFIED)

    async def one(self) -> Outcome:
        import grpc

        from services.common.pb import common_pb2
        now = lambda: time.monotonic() - self.t_start          # noqa: E731
        out = Outcome(now(), 0.0, "OK")
        call = self.stub.GenerateStream(self.request(), metadata=self.auth, timeout=self.deadline_s)
        try:
            async with asyncio.timeout(self.deadline_s + 10):
                async for chunk in call:
                    if out.chunks == 0:
                        out.first_chunk_s = now() - out.t0
                    out.chunks += 1
                    out.tokens += len(chunk.token_ids)
                    if chunk.HasField("source"):
                        out.source = {common_pb2.Source.KIND_MODEL: "model", common_pb2.Source.KIND_CACHE_EXACT:
                                      "cache_exact", common_pb2.Source.KIND_CACHE_SEMANTIC: "cache_semantic"}.get(
                                          chunk.source.kind, "")
                        out.replica = chunk.source.replica
                        out.usage_tokens = chunk.usage.completion_tokens
        except TimeoutError:
            out.code = "HUNG"
            call.cancel()
        except grpc.aio.AioRpcError as exc:
            out.code = exc.code().name
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                out.retry_after_s = retry_after_s(exc)
                out.refused_by = "gateway" if "gateway is at capacity" in (exc.details() or "") else "replicas"
        out.t1 = now()
        self.outcomes.append(out)
        return out

    async def caller(self, until: float) -> None:
        """Closed loop until `until` (phase seconds), backing off as a well-behaved client does."""
        while not self.stopping and time.monotonic() - self.t_start < until:
            out = await self.one()
            if out.code == "RESOURCE_EXHAUSTED":
                await asyncio.sleep(out.retry_after_s or 1.0)
            elif out.code != "OK":
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self.channel.close()


async def new_key(gateway: str, admin_token: str, tenant: str, concurrent_requests: int = 0) -> tuple[str, str]:
    import grpc

    from services.common.pb import gateway_pb2, gateway_pb2_grpc
    async with grpc.aio.insecure_channel(gateway) as ch:
        r = await gateway_pb2_grpc.GatewayAdminStub(ch).CreateKey(
            gateway_pb2.CreateKeyRequest(tenant=tenant, limits=gateway_pb2.KeyLimits(concurrent_requests=concurrent_requests)),
            metadata=(("authorization", f"Bearer {admin_token}"),), timeout=10)
    return r.key, r.key_id


async def usage(gateway: str, admin_token: str, key_id: str, days: list[str]) -> dict:
    import grpc

    from services.common.pb import gateway_pb2, gateway_pb2_grpc
    total = collections.Counter()
    async with grpc.aio.insecure_channel(gateway) as ch:
        admin = gateway_pb2_grpc.GatewayAdminStub(ch)
        for day in sorted(set(days)):
            r = await admin.GetUsage(gateway_pb2.GetUsageRequest(key_id=key_id, day=day),
                                     metadata=(("authorization", f"Bearer {admin_token}"),), timeout=10)
            total.update(requests=r.requests, completion_tokens=r.completion_tokens, cache_hits=r.cache_hits)
    return dict(total)


def summarize(outcomes: list[Outcome]) -> dict:
    codes = collections.Counter(o.code for o in outcomes)
    ok = [o for o in outcomes if o.code == "OK"]
    lat = [o.t1 - o.t0 for o in ok]
    ttft = [o.first_chunk_s for o in ok if o.first_chunk_s is not None]

    def pct(xs: list[float]) -> dict:
        return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99)), "max": float(max(xs))} if xs else {}
    refused = [1e3 * (o.t1 - o.t0) for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]
    by_layer = {layer: pct([1e3 * (o.t1 - o.t0) for o in outcomes if o.refused_by == layer])
                for layer in ("gateway", "replicas")}
    return {"requests": len(outcomes), "by_code": dict(codes), "hung": codes.get("HUNG", 0),
            "refusal_ms": pct(refused), "refusal_ms_by_layer": by_layer,
            "refused_by": dict(collections.Counter(o.refused_by for o in outcomes if o.refused_by)),
            "bad_status": sum(codes.get(c, 0) for c in BAD_CODES - {"HUNG"}),
            "by_source": dict(collections.Counter(o.source for o in ok)),
            "latency_s": pct(lat), "first_chunk_s": pct(ttft),
            "tokens": sum(o.tokens for o in ok)}


def timeline(outcomes: list[Outcome], bin_s: float = 2.0) -> dict:
    """Outcomes by the time they ended: {code: counts per bin}."""
    if not outcomes:
        return {"bin_s": bin_s, "counts": {}}
    n = int(max(o.t1 for o in outcomes) // bin_s) + 1
    counts: dict[str, list[int]] = {}
    for o in outcomes:
        counts.setdefault(o.code, [0] * n)[int(o.t1 // bin_s)] += 1
    return {"bin_s": bin_s, "counts": counts}


# ---- phases

async def soak(cluster: Cluster, a: argparse.Namespace) -> dict:
    key, _ = await new_key(cluster.address("gateway"), cluster.admin_token, "soak")
    load = Load(cluster.address("gateway"), key, a.deadline_s, seed=1)
    rss: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            t = time.monotonic() - load.t_start
            for name, mib in cluster.rss_mib().items():
                rss[name].append((t, mib))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
    task = asyncio.create_task(sampler())
    print(f"  soak: {a.clients} streaming callers for {a.soak_s:.0f} s", flush=True)
    await asyncio.gather(*(load.caller(a.soak_s) for _ in range(a.clients)))
    state = await settle(cluster)
    await asyncio.sleep(2.0)                         # one more sample, idle
    stop.set()
    await task
    await load.close()
    warm = a.soak_s * a.warmup_frac
    growth = {}
    for name, series in rss.items():
        after = [m for t, m in series if t >= warm]
        if len(after) >= 4:
            q = max(1, len(after) // 4)
            first, last = float(np.median(after[:q])), float(np.median(after[-q:]))
            growth[name] = {"after_warmup_mib": first, "end_mib": last, "growth_mib": last - first,
                            "growth_pct": 100 * (last - first) / first}
    res = {"clients": a.clients, "seconds": a.soak_s, "warmup_s": warm, **summarize(load.outcomes),
           "rss_mib": {k: v for k, v in rss.items()}, "rss_growth": growth, "end_state": state,
           "timeline": timeline(load.outcomes, 5.0)}
    print(f"  soak: {res['requests']} requests {res['by_code']}, hung {res['hung']}, idle at end {state['idle']}", flush=True)
    return res


async def backpressure(cluster: Cluster, a: argparse.Namespace) -> dict:
    key, _ = await new_key(cluster.address("gateway"), cluster.admin_token, "backpressure")
    rows = []
    for rate in a.rates:
        load = Load(cluster.address("gateway"), key, a.deadline_s, seed=int(rate * 10))
        n = int(rate * a.rate_s)
        t0 = time.monotonic()

        async def at(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            await load.one()
        await asyncio.gather(*(at(i) for i in range(n)))
        end = max(o.t1 for o in load.outcomes)
        s = summarize(load.outcomes)
        row = {"offered_rps": rate, "sent": n, "by_code": s["by_code"], "hung": s["hung"], "bad_status": s["bad_status"],
               "goodput_rps": s["by_code"].get("OK", 0) / end, "model_answers": s["by_source"].get("model", 0),
               "answer_latency_s": s["latency_s"], "refused": s["by_code"].get("RESOURCE_EXHAUSTED", 0),
               "refusal_latency_ms": s["refusal_ms"]}
        await load.close()
        state = await settle(cluster)
        row["idle_after"] = state["idle"]
        rows.append(row)
        print(f"  offered {rate:g}/s: goodput {row['goodput_rps']:.2f}/s, answers p50/p99 "
              f"{s['latency_s'].get('p50', 0):.1f}/{s['latency_s'].get('p99', 0):.1f} s, refused {row['refused']} "
              f"(p99 {row['refusal_latency_ms'].get('p99', 0):.0f} ms), {s['by_code']}", flush=True)
    return {"rate_s": a.rate_s, "rates": rows}


async def faults(cluster: Cluster, a: argparse.Namespace) -> dict:
    gateway = cluster.address("gateway")
    key, key_id = await new_key(gateway, cluster.admin_token, "faults")
    days = [utc_day()]
    load = Load(gateway, key, a.deadline_s, seed=3)
    # a key allowed 2 concurrent requests: its limit is probed before the Redis restart, while Redis is down
    # (fail-open admits all), and after (enforced again, and no slot lost to a reconcile Redis missed)
    limited, _ = await new_key(gateway, cluster.admin_token, "faults-limited", concurrent_requests=2)
    probe = Load(gateway, limited, a.deadline_s, seed=4, bypass_cache=True)
    # the probe's calls must overlap: an answer ending at an early EOS let the third in (a flake, 2026-12-03)
    probe.max_tokens, probe.ignore_eos = (64, 64), True
    probes: dict[str, dict] = {}
    events: list[dict] = []
    circuit: list[tuple[float, float | None, float | None]] = []     # (t, circuit state, healthy) of inference-1
    stop = asyncio.Event()
    now = lambda: time.monotonic() - load.t_start                   # noqa: E731
    victim = cluster.address("inference-1")

    async def watch_router() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                m = await asyncio.to_thread(cluster.metrics, "router")
                state = next((v for (n, lab), v in m.items() if n == "strata:circuit_state" and victim in str(lab)), None)
                healthy = next((v for (n, lab), v in m.items() if n == "strata:backend_healthy" and victim in str(lab)), None)
                circuit.append((now(), state, healthy))
            await asyncio.sleep(0.5)

    async def mark(what: str) -> None:
        events.append({"t": now(), "event": what})
        print(f"  {now():6.1f} s  {what}", flush=True)

    async def outage(name: str, down_s: float, then=lambda: None) -> None:
        await mark(f"kill {name} (SIGKILL)")
        cluster.kill(name)
        then()
        await asyncio.sleep(down_s)
        await mark(f"restart {name}")
        await cluster.restart(name)
        await mark(f"{name} serving")

    async def limit_probe(when: str, n: int = 3) -> None:
        outs = await asyncio.gather(*(probe.one() for _ in range(n)))
        probes[when] = dict(collections.Counter(o.code for o in outs))
        print(f"  {now():6.1f} s  {n} calls at once on a key allowed 2: {probes[when]} ({when})", flush=True)

    async def victim_state() -> tuple[bool, float]:
        """(at least 2 calls in flight on inference-1 by the router's count, its generated-token counter)"""
        m = await asyncio.to_thread(cluster.metrics, "router")
        busy = sum(v for (n, lab), v in m.items() if n == "strata:backend_in_flight" and victim in str(lab)) >= 2
        r = await asyncio.to_thread(cluster.metrics, "inference-1")
        return busy, sum(v for (n, _), v in r.items() if n == "strata:generation_tokens_total")

    async def script() -> None:
        g = a.fault_gap_s
        # kill it while it streams answers: calls in flight on it and its token count moving since the last
        # look (50 ms). Answers of 8-24 tokens last 0.1-0.3 s on a fast host, about the time between the look
        # and the kill: twice (a fixed 1 s wait, then this look alone) every stream on the replica had ended or
        # not yet sent its first chunk (which the router retries elsewhere) when the kill came, and no stream
        # was cut to check (CI, 2026-12-02). Answers of 48-64 tokens from the gap before the kill until it.
        load.max_tokens = (48, 64)
        await asyncio.sleep(g)
        tokens = None
        for _ in range(400):
            busy, now_tokens = await victim_state()
            if busy and tokens is not None and now_tokens > tokens:
                break
            tokens = now_tokens
            await asyncio.sleep(0.05)
        await outage("inference-1", g, then=lambda: setattr(load, "max_tokens", (8, 24)))
        await asyncio.sleep(a.circuit_cooldown_s + g)
        await limit_probe("before the Redis restart")
        during = asyncio.create_task(limit_probe("in flight across the Redis restart", 2))
        await asyncio.sleep(1.0)                      # their slots are leased: their release needs Redis back
        await outage("redis", a.outage_s)
        await during
        # a call that ended while Redis was down gives its slot back from a retry at 1, 3, 7, 15 s after it
        # ended (stages/settle.py): the probe waits for the retry that comes after Redis is back, not less
        # (with 4 s it raced that retry and found the slot still held on a fast hour)
        await asyncio.sleep(g + 8.0)
        await limit_probe("after the Redis restart")
        for name in ("cache", "router"):
            await outage(name, a.outage_s)
            await asyncio.sleep(g)
        await mark("end of load")

    watcher = asyncio.create_task(watch_router())
    driver = asyncio.create_task(script())
    callers = [asyncio.create_task(load.caller(float("inf"))) for _ in range(a.fault_clients)]
    await driver
    load.stopping = True                              # the open calls end on their own (none is cut here)
    await asyncio.gather(*callers)
    state = await settle(cluster)
    stop.set()
    await watcher
    await load.close()
    days.append(utc_day())
    counted = await usage(gateway, cluster.admin_token, key_id, days)
    at = {e["event"]: e["t"] for e in events}
    outs = load.outcomes

    def between(t0: float, t1: float, ended: bool = False) -> list[Outcome]:
        return [o for o in outs if t0 <= (o.t1 if ended else o.t0) < t1]
    served = [o for o in outs if o.code == "OK"]
    # replica kill: what ended on it, where the answers went, the circuit
    k0, k1 = at["kill inference-1 (SIGKILL)"], at["inference-1 serving"]
    cut = [o for o in between(k0, k0 + 5, ended=True) if o.code != "OK" and o.chunks > 0]
    answered_meanwhile = collections.Counter(o.replica for o in between(k0 + 1, at["restart inference-1"]) if o.code == "OK" and o.source == "model")
    after = collections.Counter(o.replica for o in between(k1 + a.circuit_cooldown_s, at["kill redis (SIGKILL)"]) if o.code == "OK" and o.source == "model")
    opened = [t for t, s, _ in circuit if k0 <= t and s == 2]
    closed_again = [t for t, s, _ in circuit if t >= k1 and s == 0]
    unhealthy = [t for t, _, h in circuit if k0 <= t and h == 0]
    replica_kill = {"streams_cut": len(cut), "cut_codes": dict(collections.Counter(o.code for o in cut)),
                    "answered_by_while_down": dict(answered_meanwhile), "answered_by_after_return": dict(after),
                    "circuit_opened_after_s": (opened[0] - k0) if opened else None,
                    "marked_unhealthy_after_s": (unhealthy[0] - k0) if unhealthy else None,
                    "circuit_closed_after_return_s": (closed_again[0] - k1) if closed_again else None}

    def window(t0: float, t1: float) -> dict:
        o = between(t0, t1)
        return {"requests": len(o), "by_code": dict(collections.Counter(x.code for x in o)),
                "by_source": dict(collections.Counter(x.source for x in o if x.code == "OK")),
                "slowest_s": max((x.t1 - x.t0 for x in o), default=0.0)}

    def recovery(restarted: str, since: float) -> float | None:
        ok = [o.t1 for o in outs if o.code == "OK" and o.t0 >= since]
        return (min(ok) - at[restarted]) if ok else None
    redis = {"during": window(at["kill redis (SIGKILL)"], at["redis serving"]),
             "after": window(at["redis serving"], at["kill cache (SIGKILL)"])}
    cache = {"before": window(at["redis serving"], at["kill cache (SIGKILL)"]),
             "during": window(at["kill cache (SIGKILL)"], at["cache serving"]),
             "after": window(at["cache serving"] + 1, at["end of load"])}   # the router outage too
    router = {"during": window(at["kill router (SIGKILL)"] + 0.5, at["restart router"]),
              "after": window(at["router serving"], at["end of load"]),
              "first_answer_after_ready_s": recovery("router serving", at["router serving"])}
    fail_lat = [o.t1 - o.t0 for o in between(at["kill router (SIGKILL)"] + 0.5, at["restart router"]) if o.code == "UNAVAILABLE"]
    router["unavailable_latency_ms_p99"] = 1e3 * float(np.percentile(fail_lat, 99)) if fail_lat else None
    # charged: the tokens of model answers and of streams cut short (what the caller received), never a cache hit's
    usage_check = {"counted": counted, "answers": len(served),
                   "charged_tokens_received": sum(o.tokens for o in outs if o.source == "model" or o.code != "OK"),
                   "cache_hits": sum(o.source.startswith("cache") for o in served),
                   "failed_after_final_chunk": sum(1 for o in outs if o.code != "OK" and o.source),
                   "answers_whose_usage_differs_from_tokens_received": sum(
                       1 for o in served if o.source == "model" and o.usage_tokens != o.tokens)}
    await probe.close()
    res = {"clients": a.fault_clients, "events": events, **summarize(outs), "replica_kill": replica_kill,
           "limit_probes": probes,
           "redis_restart": redis, "cache_restart": cache, "router_restart": router, "usage": usage_check,
           "end_state": state, "circuit": circuit, "timeline": timeline(outs, 1.0),
           "not_answered": [asdict(o) for o in outs if o.code != "OK"]}
    print(f"  faults: {res['requests']} requests {res['by_code']}, hung {res['hung']}; usage counted "
          f"{counted.get('requests')} for {len(served)} answers; idle at end {state['idle']}", flush=True)
    return res


def checks(result: dict, refusal_p99_ms: float = 1000.0) -> dict:
    """The guarantees, each true or false, from what was measured."""
    out: dict[str, bool] = {}
    for phase in ("soak", "faults"):
        p = result.get(phase)
        if p:
            out[f"{phase}: no call hung"] = p["hung"] == 0
            out[f"{phase}: no UNKNOWN/INTERNAL status"] = p["bad_status"] == 0
            out[f"{phase}: every KV block free and nothing in flight at the end"] = p["end_state"]["idle"]
            layers = p["refusal_ms_by_layer"]
            out[f"{phase}: the gateway's own refusals within {refusal_p99_ms / 1000:g} s (p99)"] = \
                layers["gateway"].get("p99", 0) < refusal_p99_ms
            out[f"{phase}: refusals for full queues faster than answers (p99 < answers' p50)"] = (
                layers["replicas"].get("p99", 0) < 1e3 * p["latency_s"].get("p50", float("inf")))
    soak = result.get("soak")
    if soak and soak["seconds"] >= 300:     # a short soak is mostly warm-up: the test's 30-s run does not judge it
        # the cache service and Redis hold the entries they store (bounded by --max-entries and the TTL)
        out["soak: memory flat after warm-up in the replicas, router and gateway (RSS growth under 2% or 16 MiB)"] = all(
            g["growth_mib"] < max(16.0, 0.02 * g["after_warmup_mib"]) for name, g in soak["rss_growth"].items()
            if name not in ("cache", "redis"))
    if "backpressure" in result:
        rows = result["backpressure"]["rates"]
        out["backpressure: no call hung"] = all(r["hung"] == 0 for r in rows)
        out["backpressure: refusals faster than answers (p99 < answers' p50)"] = all(
            r["refusal_latency_ms"].get("p99", 0) < 1e3 * r["answer_latency_s"].get("p50", float("inf")) for r in rows)
        out["backpressure: idle after each rate"] = all(r["idle_after"] for r in rows)
    f = result.get("faults")
    if f:
        k = f["replica_kill"]
        out["replica kill: streams on it ended UNAVAILABLE"] = k["streams_cut"] > 0 and set(k["cut_codes"]) == {"UNAVAILABLE"}
        out["replica kill: answers came from the other replica meanwhile"] = set(k["answered_by_while_down"]) == {"inference-0"}
        out["replica kill: circuit opened (or health marked it down)"] = (k["circuit_opened_after_s"] is not None
                                                                          or k["marked_unhealthy_after_s"] is not None)
        out["replica kill: circuit closed and traffic returned"] = (k["circuit_closed_after_return_s"] is not None
                                                                    and "inference-1" in k["answered_by_after_return"])
        p = f["limit_probes"]
        out["redis restart: a key's concurrency limit is enforced before and after, no slot lost"] = all(
            p.get(w) == {"OK": 2, "RESOURCE_EXHAUSTED": 1} for w in ("before the Redis restart", "after the Redis restart"))
        out["redis restart: answers continued and resumed"] = (f["redis_restart"]["during"]["by_code"].get("OK", 0) > 0
                                                              and f["redis_restart"]["after"]["by_code"].get("OK", 0) > 0)
        out["cache restart: answers continued, hits resumed"] = (f["cache_restart"]["during"]["by_code"].get("OK", 0) > 0
                                                                and any(s.startswith("cache") for s in f["cache_restart"]["after"]["by_source"]))
        out["router restart: UNAVAILABLE meanwhile, answers after"] = (
            set(f["router_restart"]["during"]["by_code"]) <= {"UNAVAILABLE", "OK"}
            and f["router_restart"]["after"]["by_code"].get("OK", 0) > 0)
        u = f["usage"]
        out["usage: every answer counted once, every token received charged once"] = (
            u["counted"].get("requests") == u["answers"] and u["counted"].get("cache_hits") == u["cache_hits"]
            and u["counted"].get("completion_tokens") == u["charged_tokens_received"])
    return out


def lost(result: dict) -> dict:
    """What the run lost, summed over its phases (the target: zeros)."""
    phases = [result[p] for p in ("soak", "faults") if p in result]
    rows = result.get("backpressure", {}).get("rates", [])
    out = {"calls_hung": sum(p["hung"] for p in phases) + sum(r["hung"] for r in rows),
           "unknown_or_internal_statuses": sum(p["bad_status"] for p in phases) + sum(r["bad_status"] for r in rows),
           "phases_not_idle_at_end": [n for n in ("soak", "faults") if n in result and not result[n]["end_state"]["idle"]]
                                     + (["backpressure"] if not all(r["idle_after"] for r in rows) else [])}
    if "faults" in result:
        u = result["faults"]["usage"]
        out["answers_not_counted"] = u["answers"] - u["counted"].get("requests", 0)
        out["tokens_charged_minus_received"] = u["counted"].get("completion_tokens", 0) - u["charged_tokens_received"]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    (a1, a2), (a3, a4) = axes
    if "soak" in result:
        warm = result["soak"]["warmup_s"]
        for name, series in result["soak"]["rss_mib"].items():
            t, m = map(np.array, zip(*series))
            base = np.median(m[t >= warm][:5]) if (t >= warm).any() else m[0]
            a1.plot(t, m - base, label=f"{name} ({base:.0f} MiB at warm-up end)")
        a1.axvline(warm, color="gray", ls=":", label="end of warm-up")
        a1.axhline(0, color="black", lw=0.5)
        a1.set(xlabel="s", ylabel="RSS change (MiB)",
               title=f"soak: {result['soak']['clients']} streaming callers, RSS per service")
        a1.legend(fontsize=7)
        tl = result["soak"]["timeline"]
        for code, counts in sorted(tl["counts"].items()):
            a2.plot(np.arange(len(counts)) * tl["bin_s"], np.array(counts) / tl["bin_s"], label=code)
        a2.set(xlabel="s", ylabel="calls ended per s", title="soak: outcomes over time")
        a2.legend(fontsize=7)
    if "backpressure" in result:
        rows = result["backpressure"]["rates"]
        x = [r["offered_rps"] for r in rows]
        a3.plot(x, [r["goodput_rps"] for r in rows], "o-", label="goodput (answers/s)")
        a3.plot(x, [r["refused"] / result["backpressure"]["rate_s"] for r in rows], "s--", label="refused/s")
        a3.set(xscale="log", xlabel="offered requests/s (open loop)", ylabel="per s",
               title=f"backpressure: {result['config']['max_queued']} queued per replica at most")
        a3.set_xticks(x, [f"{v:g}" for v in x])
        a3.minorticks_off()
        ax = a3.twinx()
        ax.plot(x, [r["answer_latency_s"].get("p99", np.nan) for r in rows], "^:", color="tab:red", label="answer p99 (s)")
        ax.set_ylabel("answer p99 latency (s)", color="tab:red")
        a3.legend(fontsize=7, loc="upper left")
    if "faults" in result:
        f = result["faults"]
        tl = f["timeline"]
        n = max((len(c) for c in tl["counts"].values()), default=0)
        bottom = np.zeros(n)
        for code, counts in sorted(tl["counts"].items()):
            a4.bar(np.arange(n) * tl["bin_s"], counts, width=tl["bin_s"], bottom=bottom, label=code, align="edge")
            bottom += counts
        for e in f["events"]:
            if e["event"].startswith("kill"):
                a4.axvline(e["t"], color="red", ls="--", lw=0.8)
                a4.text(e["t"], bottom.max() * 0.95 if n else 1, e["event"].split(" (")[0], rotation=90, fontsize=6,
                        va="top")
            elif e["event"].endswith("serving"):
                a4.axvline(e["t"], color="green", ls=":", lw=0.8)
        a4.set(xlabel="s", ylabel="calls ended", title=f"faults under {f['clients']} callers (red: kill, green: back)")
        a4.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"Strata hardening — {m['cpu_count']} CPUs: {m['cpu_model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run(a: argparse.Namespace) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="strata-hardening-"))
    cluster = Cluster(run_dir, a.max_queued, a.gateway_max_in_flight, a.circuit_cooldown_s)
    out: dict = {}
    try:
        t0 = time.monotonic()
        await cluster.start()
        print(f"  suite up in {time.monotonic() - t0:.0f} s ({run_dir})", flush=True)
        for phase in a.phases:
            out[phase] = await {"soak": soak, "backpressure": backpressure, "faults": faults}[phase](cluster, a)
    finally:
        cluster.stop()
    return out


def main(argv: list[str] | None = None) -> dict:
    from bench.serving import machine_info

    p = argparse.ArgumentParser(prog="python -m bench.hardening", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--soak-s", type=float, default=360.0)
    p.add_argument("--warmup-frac", type=float, default=0.25, help="share of the soak counted as warm-up for RSS")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--rate-s", type=float, default=20.0)
    p.add_argument("--fault-clients", type=int, default=40)
    p.add_argument("--fault-gap-s", type=float, default=8.0, help="load between one fault and the next")
    p.add_argument("--refusal-p99-ms", type=float, default=1000.0,
                   help="the bound on the p99 of the gateway's own refusals (its in-flight cap)")
    p.add_argument("--outage-s", type=float, default=5.0, help="how long Redis, the cache and the router stay down")
    p.add_argument("--circuit-cooldown-s", type=float, default=10.0, help="the router's open-circuit cool-down")
    p.add_argument("--deadline-s", type=float, default=60.0)
    p.add_argument("--max-queued", type=int, default=128, help="each replica's --max-queued-requests")
    p.add_argument("--gateway-max-in-flight", type=int, default=1024)
    p.add_argument("--phases", type=lambda s: s.split(","), default=["soak", "backpressure", "faults"])
    p.add_argument("--no-plot", action="store_true", help="only the JSON (no matplotlib needed: the test's run)")
    smoke.add_args(p, "hardening")
    # smoke: every phase, a few seconds each (the suite's start and the fault phase's restarts take the rest)
    a = smoke.resolve(p.parse_args(argv), clients=8, soak_s=4.0, rates=[4.0, 32.0], rate_s=2.0, fault_clients=4,
                      fault_gap_s=2.0, outage_s=1.0, max_queued=4, gateway_max_in_flight=16, no_plot=True)
    from services.common import aio
    res = aio.run(run(a))
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "no_plot"},
              "machine": machine_info(), **res}
    result["checks"] = checks(result, a.refusal_p99_ms)
    result["lost"] = lost(result)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    if not a.no_plot:
        plot(result, a.out.with_suffix(".png"))
    for name, ok in result["checks"].items():
        print(f"  {'ok ' if ok else 'FAILED'}  {name}")
    print(f"wrote {a.out}" + ("" if a.no_plot else f" and {a.out.with_suffix('.png')}"))
    return result


if __name__ == "__main__":
    main()
