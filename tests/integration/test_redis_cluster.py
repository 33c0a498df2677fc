"""Redis Cluster, on real processes: three redis-server nodes with cluster mode on, joined by `redis-cli
--cluster create`. Every Strata Redis client takes a redis+cluster:// URL; each keyspace's prefix is hash-tagged
(redis_client.keyspace) so that its Lua scripts and transactions, which span keys, run on one slot. Checked over
the cluster: the gateway (its real GatewayService: keys and their administration with the audit log, limits,
usage, budgets, background jobs with their commit script), the semantic cache's store, and the replica
registry."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import grpc
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.cluster import key_slot

from services.common import redis_client
from services.common.errors import ResourceExhaustedError
from services.common.models_file import DEFAULT_TIERS
from services.common.registry import Registry
from services.gateway.config import GatewayConfig, ModelPrice
from services.gateway.jobs import JobsConfig
from services.gateway.main import GatewayService, GatewayServiceConfig
from services.gateway.types import Request, Sampling
from services.gateway.usage import utc_day
from tests.integration.test_redis_sentinel import SlowBackends, free_port

PEPPER, ADMIN = "test-pepper-0123456789", "cluster-admin-token"


@pytest.fixture()
def cluster(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server is not installed: `make install` installs it (apt-get install -y redis-server)")
    ports = [free_port() for _ in range(3)]
    procs = []
    for port in ports:
        d = tmp_path / str(port)
        d.mkdir()
        # the cluster bus gets a free port of its own: its default, port + 10000, is past 65535 for a high port
        procs.append(subprocess.Popen([binary, "--port", str(port), "--cluster-port", str(free_port()),
                                       "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                                       "--cluster-config-file", str(d / "nodes.conf"), "--dir", str(d), "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL))
    try:
        deadline = time.monotonic() + 10
        for port in ports:                    # every node up before the cluster is made of them
            while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode != 0:
                assert all(p.poll() is None for p in procs), "a node exited at start"
                assert time.monotonic() < deadline, "the nodes did not start"
                time.sleep(0.05)
        out = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                              "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        while b"cluster_state:ok" not in subprocess.run(["redis-cli", "-p", str(ports[0]), "cluster", "info"],
                                                         capture_output=True).stdout:
            assert time.monotonic() < deadline + 20, "the cluster did not come up"
            time.sleep(0.1)
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports[:2])
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_cluster_urls_are_read_and_bad_ones_refused():
    assert redis_client.parse_cluster("redis+cluster://:pw@10.0.0.1:7000,[::1]:7001") == [("10.0.0.1", 7000), ("::1", 7001)]
    for bad in ("redis+cluster://host", "redis+cluster://h:1/0"):
        with pytest.raises(ValueError):
            redis_client.parse_cluster(bad)


async def _keys_by_slot(client: RedisCluster) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    async for k in client.scan_iter(count=1000):
        out.setdefault(key_slot(k), []).append(k.decode())
    return out


@pytest.mark.asyncio(loop_scope="session")
async def test_the_gateway_its_jobs_and_the_cache_run_on_a_cluster_each_keyspace_in_one_slot(cluster, embedder):
    from services.cache.main import CacheService
    from services.cache.service import CacheConfig
    from services.common.pb import cache_pb2, cache_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc

    jobs = JobsConfig(workers=2, poll_s=0.05, claim_idle_s=2.0, backoff_base_s=0.05, backoff_max_s=0.2)
    svc = GatewayService(GatewayServiceConfig(GatewayConfig(models={"small": ModelPrice(1.0, 2.0)}, tiers={
        n: t for n, t in DEFAULT_TIERS.items()}), cluster, "127.0.0.1:1", "", PEPPER, ADMIN, jobs=jobs))
    svc.gateway.backends = svc.gateway.route.backends = svc.gateway.cache.backends = SlowBackends(["a", "b"])
    port = await svc.start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    admin = gateway_pb2_grpc.GatewayAdminStub(ch)
    auth = (("authorization", f"Bearer {ADMIN}"),)
    cache = CacheService(CacheConfig(redis_url=cluster, health_interval_s=0.2), port=0, embedder=embedder)
    cache_port = await cache.start()
    cache_ch = grpc.aio.insecure_channel(f"127.0.0.1:{cache_port}")
    client = redis_client.connect(cluster)
    try:
        assert isinstance(svc.redis, RedisCluster)
        # keys and their administration (WATCH/MULTI with the audit log), limits, usage, budgets
        made = await admin.CreateKey(gateway_pb2.CreateKeyRequest(
            tenant="acme", limits=gateway_pb2.KeyLimits(requests_per_minute=3)), metadata=auth)
        await admin.UpdateKey(gateway_pb2.UpdateKeyRequest(key_id=made.key_id, budget_usd=5.0), metadata=auth)
        await admin.SetTenantBudget(gateway_pb2.TenantBudget(tenant="acme", budget_usd=10.0, period="monthly"),
                                    metadata=auth)
        request = Request(model="small", prompt="hi", sampling=Sampling(max_tokens=2))
        for _ in range(3):
            await svc.gateway.generate(request, made.key)
        with pytest.raises(ResourceExhaustedError):                  # the limit holds
            await svc.gateway.generate(request, made.key)
        audit = await admin.ListAudit(gateway_pb2.ListAuditRequest(key_id=made.key_id), metadata=auth)
        assert [e.action for e in audit.entries][:2] == ["update", "create"]
        # a job: its items through the pipeline, committed with their usage in one script
        unlimited = await admin.CreateKey(gateway_pb2.CreateKeyRequest(tenant="acme"), metadata=auth)
        job = await gateway_pb2_grpc.GatewayStub(ch).SubmitJob(gateway_pb2.SubmitJobRequest(
            requests=[gateway_pb2.GatewayRequest(model="small", prompt=f"q{i}") for i in range(6)]),
            metadata=(("authorization", f"Bearer {unlimited.key}"),))
        deadline = time.monotonic() + 30
        while not (done := await svc.jobs.get(unlimited.key_id, job.id)).state.final:
            assert time.monotonic() < deadline, "the job did not finish"
            await asyncio.sleep(0.05)
        assert done.completed == 6
        await svc.usage.flush()
        assert (await svc.usage.day(made.key_id, utc_day())).requests == 3
        assert (await svc.usage.day(unlimited.key_id, utc_day())).requests == 6
        assert await svc.usage.tenant_spend("acme", utc_day()[:7]) > 0
        # the cache: store (a script over the entry, its exact key, the namespace's LRU and the events stream)
        stub = cache_pb2_grpc.SemanticCacheStub(cache_ch)
        q = cache_pb2.CacheQuery(namespace="acme", model="small", sampling=common_pb2.SamplingParams(temperature=0.0),
                                 messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="hi")]))
        stored = await stub.Store(cache_pb2.StoreRequest(query=q, answer=cache_pb2.CachedAnswer(
            text="hello", finish_reason=common_pb2.FINISH_REASON_STOP)))
        assert stored.stored
        assert (await stub.Lookup(cache_pb2.LookupRequest(query=q))).hit
        # the replica registry
        registry = Registry(client)
        await registry.heartbeat("10.0.0.7:50061", 30)
        assert await registry.alive() == ["10.0.0.7:50061"]
        # every gateway and jobs key in the slot of {strata:gw}, every cache key in that of {strata:cache}
        slots = await _keys_by_slot(client)
        gw_keys = [k for k in sum(slots.values(), []) if k.startswith("{strata:gw}:")]
        cache_keys = [k for k in sum(slots.values(), []) if k.startswith("{strata:cache}:")]
        assert any(":jobs:" in k for k in gw_keys) and any(":usage:" in k for k in gw_keys) and cache_keys
        assert set(slots[key_slot(b"{strata:gw}")]) >= set(gw_keys)
        assert set(slots[key_slot(b"{strata:cache}")]) >= set(cache_keys)
        assert not [k for k in sum(slots.values(), []) if k.startswith(("strata:gw:", "strata:jobs:", "strata:cache:"))]
    finally:
        await ch.close()
        await cache_ch.close()
        await cache.stop(0)
        await svc.stop(0)
        await client.aclose()

