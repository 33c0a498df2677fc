"""The SemanticCache gRPC service over a real redis-server and the real embedding model (port 0)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cache.main import SERVICE_NAME, CacheService
from services.cache.service import CacheConfig
from services.common.pb import cache_pb2, cache_pb2_grpc, common_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
MODEL = "SmolLM2-135M-Instruct"


class Replica:
    """One cache service on port 0 with a channel and stubs."""

    def __init__(self, svc: CacheService, port: int, channel: grpc.aio.Channel) -> None:
        self.svc, self.port, self.channel = svc, port, channel
        self.stub = cache_pb2_grpc.SemanticCacheStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    async def health_status(self) -> int:
        return (await self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2)).status


@pytest.fixture()
async def start_replica(redis_url, embedder):
    started: list[Replica] = []

    async def start(**overrides) -> Replica:
        cfg = CacheConfig(**{"redis_url": redis_url, "health_interval_s": 0.2, "sweep_interval_s": 0.5, **overrides})
        svc = CacheService(cfg, port=0, embedder=embedder)
        port = await svc.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        replica = Replica(svc, port, channel)
        started.append(replica)
        return replica

    yield start
    for r in started:
        await r.channel.close()
        await r.svc.stop(0)


def query(text: str, ns: str = "tenant-a", model: str = MODEL, system: str | None = None, **sampling) -> cache_pb2.CacheQuery:
    sampling.setdefault("temperature", 0.0)
    msgs = ([common_pb2.ChatMessage(role="system", content=system)] if system else [])
    msgs.append(common_pb2.ChatMessage(role="user", content=text))
    return cache_pb2.CacheQuery(namespace=ns, model=model, messages=common_pb2.ChatMessages(messages=msgs),
                                sampling=common_pb2.SamplingParams(**sampling))


def answer(text: str) -> cache_pb2.CachedAnswer:
    return cache_pb2.CachedAnswer(text=text, token_ids=[1, 2, 3], finish_reason=common_pb2.FINISH_REASON_STOP,
                                  usage=common_pb2.Usage(prompt_tokens=20, completion_tokens=3))


async def store(r: Replica, q: cache_pb2.CacheQuery, text: str, **kw) -> cache_pb2.StoreResponse:
    return await r.stub.Store(cache_pb2.StoreRequest(query=q, answer=answer(text), **kw))


async def lookup(r: Replica, q: cache_pb2.CacheQuery, **policy) -> cache_pb2.LookupResponse:
    return await r.stub.Lookup(cache_pb2.LookupRequest(query=q, policy=cache_pb2.LookupPolicy(**policy)))


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


async def test_exact_hit_miss_and_normalized_whitespace(start_replica):
    r = await start_replica()
    stored = await store(r, query("What is the capital of France?"), "Paris.")
    assert stored.stored and stored.entry_id
    hit = await lookup(r, query("  What is the capital   of France? "))
    assert hit.hit and hit.layer == cache_pb2.CACHE_LAYER_EXACT and hit.entry_id == stored.entry_id
    assert hit.answer.text == "Paris." and list(hit.answer.token_ids) == [1, 2, 3]
    assert hit.answer.usage.completion_tokens == 3 and hit.answer.finish_reason == common_pb2.FINISH_REASON_STOP
    miss = await lookup(r, query("How tall is Mount Everest?"))
    assert not miss.hit and miss.miss_reason in ("below_threshold", "not_found")
    stats = await r.stub.Stats(cache_pb2.StatsRequest(namespace="tenant-a"))
    assert stats.entries == 1 and stats.hits_exact == 1 and stats.misses == 1 and stats.redis_ok


async def test_paraphrase_hits_semantically_and_near_miss_questions_do_not(start_replica):
    r = await start_replica()
    await store(r, query("How can I learn Python quickly?"), "Practice daily.")
    hit = await lookup(r, query("How do I learn Python quickly?"))
    assert hit.hit and hit.layer == cache_pb2.CACHE_LAYER_SEMANTIC, hit
    assert hit.answer.text == "Practice daily." and 0.9 < hit.score < 1.0 and hit.confidence > 0
    # same words, another subject: the failure semantic caches are known for
    java = await lookup(r, query("How can I learn Java quickly?"))
    assert not java.hit, java
    # semantic layer off: only exact hits
    off = await lookup(r, query("How do I learn Python quickly?"), semantic=False)
    assert not off.hit
    # plain cosine threshold per request
    loose = await lookup(r, query("How can I learn Java quickly?"), min_similarity=0.5)
    assert loose.hit and loose.layer == cache_pb2.CACHE_LAYER_SEMANTIC


async def test_context_and_sampling_partition_entries(start_replica):
    r = await start_replica()
    await store(r, query("Tell me a joke about cats.", system="You are a pirate."), "Arr, a cat joke.")
    assert not (await lookup(r, query("Tell me a joke about cats."))).hit                      # no system prompt
    assert not (await lookup(r, query("Tell me a joke about cats.", system="You are a poet."))).hit
    assert not (await lookup(r, query("Tell me a joke about cats.", system="You are a pirate.", max_tokens=5))).hit
    assert (await lookup(r, query("Tell me a joke about cats.", system="You are a pirate."))).hit
    assert not (await lookup(r, query("Tell me a joke about cats.", model="other-model", system="You are a pirate."))).hit


async def test_ttl_expiry(start_replica):
    r = await start_replica()
    await store(r, query("What is the boiling point of water?"), "100 C", ttl_s=1)
    assert (await lookup(r, query("What is the boiling point of water?"))).hit
    await asyncio.sleep(1.3)   # the hit above refreshed the 1 s TTL
    assert not (await lookup(r, query("What is the boiling point of water?"))).hit
    assert not (await lookup(r, query("What's the boiling point of water?"), min_similarity=0.5)).hit
    idx = r.svc.cache.indexes["tenant-a"]
    assert await eventually(lambda: asyncio.sleep(0, result=len(idx) == 0))   # swept from the index


async def test_a_hit_refreshes_the_ttl_of_the_entry_and_its_exact_key(start_replica):
    r = await start_replica()
    await store(r, query("How far away is the Moon?"), "384,400 km", ttl_s=2)
    await asyncio.sleep(1.2)
    assert (await lookup(r, query("How far away is the Moon?"))).hit        # 2 s again from here
    await asyncio.sleep(1.2)                                                   # 2.4 s after the store
    assert (await lookup(r, query("How far away is the Moon?"))).hit
    assert (await lookup(r, query("How far is the Moon from Earth?"), min_similarity=0.5)).hit


async def test_eviction_of_least_recently_hit_at_the_cap(start_replica):
    r = await start_replica(max_entries_per_namespace=3)
    questions = ["Who wrote Hamlet?", "What is the speed of light?", "How many legs does a spider have?"]
    ids = [(await store(r, query(q), f"answer {i}")).entry_id for i, q in enumerate(questions)]
    await asyncio.sleep(0.01)
    assert (await lookup(r, query(questions[0]))).hit        # entry 0 is now the most recently hit
    await store(r, query("What is the largest ocean?"), "Pacific")
    assert not (await lookup(r, query(questions[1]))).hit   # entry 1: least recently hit, evicted
    assert (await lookup(r, query(questions[0]))).hit
    assert (await lookup(r, query(questions[2]))).hit
    stats = await r.stub.Stats(cache_pb2.StatsRequest(namespace="tenant-a"))
    assert stats.entries == 3 and stats.evictions == 1
    assert ids[1] not in r.svc.cache.indexes["tenant-a"]


async def test_delete_and_invalidate(start_replica):
    r = await start_replica()
    a = await store(r, query("What is 2 + 2?"), "4")
    await store(r, query("What is 3 + 3?"), "6")
    await store(r, query("What is 3 + 3?", model="other-model"), "six")
    assert (await r.stub.Delete(cache_pb2.DeleteRequest(namespace="tenant-a", entry_id=a.entry_id))).deleted
    assert not (await r.stub.Delete(cache_pb2.DeleteRequest(namespace="tenant-a", entry_id=a.entry_id))).deleted
    assert not (await lookup(r, query("What is 2 + 2?"))).hit
    inv = await r.stub.Invalidate(cache_pb2.InvalidateRequest(namespace="tenant-a", model="other-model"))
    assert inv.deleted == 1
    assert (await lookup(r, query("What is 3 + 3?"))).hit
    assert not (await lookup(r, query("What is 3 + 3?", model="other-model"))).hit
    inv = await r.stub.Invalidate(cache_pb2.InvalidateRequest(namespace="tenant-a"))
    assert inv.deleted == 1
    assert not (await lookup(r, query("What is 3 + 3?"))).hit


async def test_two_replicas_serve_each_others_entries_within_a_second(start_replica):
    a, b = await start_replica(), await start_replica()
    await store(a, query("What is the tallest building in the world?"), "Burj Khalifa")
    t0 = time.monotonic()
    hit = await eventually(lambda: lookup(b, query("Which building is the tallest in the world?"), min_similarity=0.8),
                           timeout=1.0)
    assert hit.hit and hit.layer == cache_pb2.CACHE_LAYER_SEMANTIC and time.monotonic() - t0 < 1.0
    await store(b, query("Who painted the Mona Lisa?"), "Leonardo da Vinci")
    hit = await eventually(lambda: lookup(a, query("Who was the painter of the Mona Lisa?"), min_similarity=0.8),
                           timeout=1.0)
    assert hit.hit
    # deletes travel too
    await b.stub.Delete(cache_pb2.DeleteRequest(namespace="tenant-a", entry_id=hit.entry_id))
    assert await eventually(lambda: asyncio.sleep(0, result=hit.entry_id not in a.svc.cache.indexes["tenant-a"]),
                            timeout=1.0)


async def test_restart_rebuilds_the_index_from_redis(start_replica):
    a = await start_replica()
    await store(a, query("What is the chemical symbol for gold?"), "Au")
    await a.svc.stop(0)
    b = await start_replica()
    assert len(b.svc.cache.indexes["tenant-a"]) == 1
    hit = await lookup(b, query("What's the chemical symbol of gold?"), min_similarity=0.8)
    assert hit.hit and hit.answer.text == "Au"


async def test_tenant_isolation(start_replica):
    r = await start_replica()
    s = await store(r, query("What is our refund policy?", ns="tenant-a"), "30 days")
    assert not (await lookup(r, query("What is our refund policy?", ns="tenant-b"))).hit
    assert not (await lookup(r, query("What is your refund policy?", ns="tenant-b"), min_similarity=0.0)).hit
    assert not (await r.stub.Delete(cache_pb2.DeleteRequest(namespace="tenant-b", entry_id=s.entry_id))).deleted
    assert (await r.stub.Invalidate(cache_pb2.InvalidateRequest(namespace="tenant-b"))).deleted == 0
    assert (await lookup(r, query("What is our refund policy?", ns="tenant-a"))).hit


async def test_sampled_requests_are_cached_only_on_opt_in(start_replica):
    r = await start_replica()
    q = query("Write a haiku about rain.", temperature=0.8)
    s = await store(r, q, "Rain falls...")
    assert not s.stored and s.reason == "not_cacheable"
    assert (await lookup(r, q, allow_sampled=True)).miss_reason == "not_found"
    assert (await store(r, q, "Rain falls...", allow_sampled=True)).stored
    miss = await lookup(r, q)
    assert not miss.hit and miss.miss_reason == "not_cacheable"
    assert (await lookup(r, q, allow_sampled=True)).hit


@pytest.mark.parametrize("q, message", [
    (cache_pb2.CacheQuery(namespace="tenant-a", model=MODEL, prompt=""), "empty"),
    (cache_pb2.CacheQuery(namespace="tenant-a", model=MODEL, prompt="   "), "empty"),
    (cache_pb2.CacheQuery(namespace="tenant-a", model=MODEL), "prompt or messages"),
    (cache_pb2.CacheQuery(namespace="bad namespace!", model=MODEL, prompt="hi"), "namespace"),
    (cache_pb2.CacheQuery(namespace="", model=MODEL, prompt="hi"), "namespace"),
    (cache_pb2.CacheQuery(namespace="x" * 65, model=MODEL, prompt="hi"), "namespace"),
    (cache_pb2.CacheQuery(namespace="tenant-a", model="", prompt="hi"), "model"),
    (cache_pb2.CacheQuery(namespace="tenant-a", model=MODEL, prompt="x" * 20_000), "longer"),
    (cache_pb2.CacheQuery(namespace="tenant-a", model=MODEL, messages=common_pb2.ChatMessages()), "empty"),
    (cache_pb2.CacheQuery(namespace="tenant-a", model=MODEL, messages=common_pb2.ChatMessages(
        messages=[common_pb2.ChatMessage(role="robot", content="hi")])), "role"),
    (cache_pb2.CacheQuery(namespace="tenant-a", model=MODEL, messages=common_pb2.ChatMessages(
        messages=[common_pb2.ChatMessage(role="assistant", content="hi")])), "last message"),
])
async def test_bad_input_is_invalid_argument(start_replica, q, message):
    r = await start_replica()
    for call in (lookup(r, q), store(r, q, "x")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()


async def test_bad_store_and_policy_values_are_invalid_argument(start_replica):
    r = await start_replica()
    for req in (cache_pb2.StoreRequest(query=query("hi"), answer=answer("x"), ttl_s=-1),
                cache_pb2.StoreRequest(query=query("hi"), answer=cache_pb2.CachedAnswer(
                    text="x", usage=common_pb2.Usage(prompt_tokens=-3)))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await r.stub.Store(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await lookup(r, query("hi"), min_similarity=1.5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await r.stub.Delete(cache_pb2.DeleteRequest(namespace="tenant-a", entry_id=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_redis_down_fast_degraded_miss_store_unavailable_health_and_recovery(start_replica, redis_server):
    r = await start_replica()
    await store(r, query("What is the capital of Japan?"), "Tokyo")
    assert await r.health_status() == health_pb2.HealthCheckResponse.SERVING
    redis_server.stop()
    try:
        t0 = time.monotonic()
        miss = await lookup(r, query("What is the capital of Japan?"))
        assert not miss.hit and miss.degraded and miss.miss_reason == "degraded"
        assert time.monotonic() - t0 < 2.0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await store(r, query("What is the capital of Italy?"), "Rome")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        status = await eventually(lambda: _not_serving(r), timeout=3.0)
        assert status
        stats = await r.stub.Stats(cache_pb2.StatsRequest())
        assert not stats.redis_ok
        t0 = time.monotonic()
        assert (await lookup(r, query("What is the capital of Japan?"))).degraded
        assert time.monotonic() - t0 < 0.5      # known down: answered without waiting on Redis
    finally:
        redis_server.start()
    assert await eventually(lambda: _serving(r), timeout=5.0)
    assert (await store(r, query("What is the capital of Italy?"), "Rome")).stored
    hit = await lookup(r, query("What is the capital of Italy?"))
    assert hit.hit and not hit.degraded


async def _serving(r: Replica) -> bool:
    return await r.health_status() == health_pb2.HealthCheckResponse.SERVING


async def _not_serving(r: Replica) -> bool:
    return await r.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("workers", [1, 2])
async def test_concurrent_lookups_are_micro_batched(start_replica, workers):
    r = await start_replica(embed_workers=workers)
    await store(r, query("What is the capital of Spain?"), "Madrid")
    batcher = r.svc.cache.batcher
    before_batches, before_items = batcher.batches, batcher.items
    qs = [query(f"Question number {i}: what is the capital of Spain?") for i in range(32)]
    results = await asyncio.gather(*(lookup(r, q) for q in qs))
    assert len(results) == 32
    items, batches = batcher.items - before_items, batcher.batches - before_batches
    assert items == 32 and batches < 32, (items, batches)
