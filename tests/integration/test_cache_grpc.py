"""The SemanticCache gRPC service over a real redis-server and the real embedding model (port 0)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import numpy as np
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


async def test_search_stores_removals_and_sweeps_run_on_the_index_thread_not_the_event_loop(start_replica):
    r = await start_replica(sweep_interval_s=0.1, default_ttl_s=1)
    seen: dict[str, set[str]] = {}
    idx_cls = type(r.svc.cache._index(r.svc.cache.indexes, "tenant-a"))
    for name in ("search", "add", "remove", "ids"):
        original = getattr(idx_cls, name)

        def record(self, *args, _name=name, _original=original):
            seen.setdefault(_name, set()).add(threading.current_thread().name)
            return _original(self, *args)

        setattr(r.svc.cache.indexes["tenant-a"], name, record.__get__(r.svc.cache.indexes["tenant-a"]))
    await store(r, query("How can I learn Python quickly?"), "Practice daily.")
    assert (await lookup(r, query("How do I learn Python quickly?"))).hit
    await asyncio.sleep(1.5)                                    # the entry expires; the sweep finds and removes it
    assert await eventually(lambda: asyncio.sleep(0, "remove" in seen and "ids" in seen))
    assert set(seen) == {"search", "add", "remove", "ids"}
    for name, threads in seen.items():
        assert threads and all(t.startswith("strata-index") for t in threads), (name, threads)


async def test_a_namespace_past_the_graph_size_grows_its_graph_in_the_background_and_serves_through_it(start_replica):
    r = await start_replica(ann_min_rows=20)
    topics = ["Python", "Rust", "chess", "jazz", "bread", "taxes", "whales", "coffee", "the moon", "volcanoes",
              "Go", "Java", "knitting", "surfing", "opera", "algebra", "poetry", "sailing", "pottery", "judo",
              "Haskell", "skiing"]
    for t in topics:
        await store(r, query(f"How can I learn {t} quickly?"), f"About {t}.")
    idx = r.svc.cache.indexes["tenant-a"]
    assert await eventually(lambda: asyncio.sleep(0, idx.graphs == 1), timeout=10)
    hit = await lookup(r, query("How do I learn chess quickly?"))
    assert hit.hit and hit.answer.text == "About chess."
    # a restarted replica rebuilds from Redis and grows the graph again
    again = await start_replica(ann_min_rows=20)
    idx2 = again.svc.cache.indexes["tenant-a"]
    assert len(idx2) == len(topics)
    assert await eventually(lambda: asyncio.sleep(0, idx2.graphs == 1), timeout=10)
    assert (await lookup(again, query("How do I learn jazz quickly?"))).answer.text == "About jazz."


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
    await store(r, query("How far away is the Moon?"), "384,400 km", ttl_s=4)
    await asyncio.sleep(2.5)                    # 1.5 s of slack each way: the host's stalls are not the TTL's
    assert (await lookup(r, query("How far away is the Moon?"))).hit        # 4 s again from here
    await asyncio.sleep(2.5)                                                   # 5 s after the store
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


async def test_embed_answers_the_lookups_model_batched_with_them_and_refuses_what_it_cannot_read(start_replica, embedder):
    r = await start_replica()
    await store(r, query("What is the capital of Spain?"), "Madrid")
    batcher = r.svc.cache.batcher
    before_batches, before_items = batcher.batches, batcher.items
    texts = [f"text number {i}" for i in range(40)]
    outs = await asyncio.gather(r.stub.Embed(cache_pb2.EmbedTextsRequest(texts=texts)),
                                *(lookup(r, query(f"Question {i}: the capital of Spain?")) for i in range(8)))
    out = outs[0]
    vectors = np.frombuffer(out.vectors, "<f4").reshape(40, out.dim)
    assert out.model == "all-MiniLM-L6-v2" and out.dim == 384
    np.testing.assert_allclose(vectors, embedder.embed(texts), atol=1e-5)
    assert list(out.tokens) == [embedder.num_tokens(t) for t in texts]
    items, batches = batcher.items - before_items, batcher.batches - before_batches
    assert items == 48 and batches < 48, (items, batches)       # the texts and the lookups share forward passes
    for texts, message in (([], "embed 1 to 2048 texts, not 0"), (["ok"] * 2049, "not 2049"),
                           (["ok", ""], "text 1 is empty"), (["word " * 300], "text 0 has 302 tokens")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await r.stub.Embed(cache_pb2.EmbedTextsRequest(texts=texts))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    cut = await r.stub.Embed(cache_pb2.EmbedTextsRequest(texts=["word " * 300], truncate=True))
    assert list(cut.tokens) == [256]


async def test_lookup_stream_answers_each_id_and_a_bad_request_does_not_end_the_stream(start_replica):
    r = await start_replica()
    await store(r, query("What is the capital of Spain?"), "Madrid")
    call = r.stub.LookupStream()
    asks = {1: query("What is the capital of Spain?"), 2: query("Who wrote Hamlet?"),
            3: cache_pb2.CacheQuery(namespace="bad namespace!", model=MODEL, prompt="hi"),
            4: query("What is the capital of  Spain? ")}
    for i, q in asks.items():
        await call.write(cache_pb2.LookupStreamRequest(id=i, request=cache_pb2.LookupRequest(query=q)))
    got = {}
    for _ in asks:
        out = await call.read()
        got[out.id] = out
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert got[1].code == 0 and got[1].response.hit and got[1].response.answer.text == "Madrid"
    assert got[2].code == 0 and not got[2].response.hit and got[2].response.miss_reason
    assert got[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "namespace" in got[3].message
    assert got[4].response.hit and got[4].response.layer == cache_pb2.CACHE_LAYER_EXACT


async def test_the_gateways_lookup_pipe_reopens_after_a_cache_restart(start_replica, redis_url, embedder):
    from services.gateway.clients import Downstream

    r = await start_replica()
    await store(r, query("What is the capital of Spain?"), "Madrid")
    down = Downstream("127.0.0.1:1", f"127.0.0.1:{r.port}")
    try:
        req = cache_pb2.LookupRequest(query=query("What is the capital of Spain?"))
        hits = await asyncio.gather(*(down.lookup(req) for _ in range(20)))
        assert all(h is not None and h.hit for h in hits)
        await r.svc.stop(0)
        assert await down.lookup(req) is None           # cache gone: a miss, not an error or a hang
        again = CacheService(CacheConfig(redis_url=redis_url), port=r.port, embedder=embedder)
        await again.start()
        try:
            hit = await eventually(lambda: down.lookup(req), timeout=5.0)
            assert hit is not None and hit.hit and hit.answer.text == "Madrid"
            assert not down._lookups.unary_only
        finally:
            await again.stop(0)
    finally:
        await down.close()


async def test_the_lookup_pipe_falls_back_to_unary_calls_on_a_cache_without_lookup_stream():
    from services.gateway.clients import Downstream

    async def unary_lookup(request, context):
        return cache_pb2.LookupResponse(hit=True, entry_id="e-1", answer=cache_pb2.CachedAnswer(text="old cache"))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("strata.v1.SemanticCache", {
        "Lookup": grpc.unary_unary_rpc_method_handler(
            unary_lookup, cache_pb2.LookupRequest.FromString, cache_pb2.LookupResponse.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # a timeout long enough for UNIMPLEMENTED to arrive on a loaded CI host (0.5 s was not, once)
    down = Downstream("127.0.0.1:1", f"127.0.0.1:{port}", cache_timeout_s=10.0)
    try:
        req = cache_pb2.LookupRequest(query=query("anything"))
        first = await down.lookup(req)                  # the stream is refused: this one is a miss
        assert first is None and down._lookups.unary_only
        hit = await down.lookup(req)
        assert hit is not None and hit.hit and hit.answer.text == "old cache"
    finally:
        await down.close()
        await server.stop(0)


async def test_a_lookup_the_cache_never_answers_is_a_miss_after_the_timeout():
    from services.gateway.clients import Downstream

    async def silent(requests, context):
        async for _ in requests:                        # reads every lookup, answers none
            pass
        yield cache_pb2.LookupStreamResponse()          # (never reached while the gateway is open)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("strata.v1.SemanticCache", {
        "LookupStream": grpc.stream_stream_rpc_method_handler(
            silent, cache_pb2.LookupStreamRequest.FromString, cache_pb2.LookupStreamResponse.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    down = Downstream("127.0.0.1:1", f"127.0.0.1:{port}", cache_timeout_s=0.3)
    try:
        t0 = time.monotonic()
        misses = await asyncio.gather(*(down.lookup(cache_pb2.LookupRequest(query=query(f"q{i}"))) for i in range(5)))
        assert misses == [None] * 5
        assert 0.25 < time.monotonic() - t0 < 2.0
        assert not down._lookups._waiting               # nothing left behind
    finally:
        await down.close()
        await server.stop(0)


async def test_strata_serve_cache_as_a_process_on_uvloop_serves_the_gateways_lookups_and_stops_on_sigterm(redis_url):
    """The CLI's service process (on uvloop, as deployed): health, Store, streamed lookups, clean SIGTERM."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from bench.cache import wait_serving
    from services.gateway.clients import Downstream

    pytest.importorskip("uvloop")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.devnull, "w")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "cache", "--port", str(port),
                             "--redis-url", redis_url], env={**os.environ, "STRATA_EVENT_LOOP": "uvloop"},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        await wait_serving(port, SERVICE_NAME, Path(os.devnull), timeout_s=60)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = cache_pb2_grpc.SemanticCacheStub(ch)
            await stub.Store(cache_pb2.StoreRequest(query=query("What is the capital of Peru?"), answer=answer("Lima")))
        down = Downstream("127.0.0.1:1", f"127.0.0.1:{port}", cache_timeout_s=5.0)
        try:
            req = cache_pb2.LookupRequest(query=query("What is the capital of Peru?"))
            hits = await asyncio.gather(*(down.lookup(req) for _ in range(50)))
            assert all(h is not None and h.hit and h.answer.text == "Lima" for h in hits)
        finally:
            await down.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
