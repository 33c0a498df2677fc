"""Property-based fuzzing (hypothesis) of the semantic cache's RPCs (Lookup, LookupStream, Store, Delete,
Invalidate, Stats) and the router's (Generate, ListBackends) on real sockets, with the strategies of
test_fuzz.py. Requests go out as bytes (test_fuzz's `wire`), so a text can also arrive as invalid UTF-8
(MARK) and a whole request as corrupt wire data (`garbage`).

Every call ends with an answer or a clear status and a short message (never UNKNOWN / INTERNAL, never a
hang); a valid request is answered; what Store stored is what Lookup serves; a bad item of a LookupStream
gets its own status, as Lookup would have answered it, and the stream carries on; no call addressed to one
namespace touches another's entry; a bad request never marks Redis down; the router's replica ends with
every KV block free and no failure counted against it.

Examples are derandomized (the same every run) and bounded: 30-40 per RPC (70 for Delete and Invalidate together)."""

from __future__ import annotations

import collections

import grpc
import pytest
from google.protobuf import wrappers_pb2
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from services.cache.keys import NAMESPACE_RE
from services.common.grpc_errors import MAX_DETAILS_CHARS
from services.common.pb import cache_pb2, common_pb2, inference_pb2, router_pb2
from tests.conftest import assert_all_blocks_free, settled
from tests.integration.downstream import running_downstream
from tests.integration.test_fuzz import (BAD_UTF8, CALL_TIMEOUT_S, INVALID, MARK, MODEL, OK, SETTINGS, enums, floats,
                                         garbage, inference_wire_requests, messages, mostly, outcome, parses, raw,
                                         sampling, texts, valid_sampling, valid_texts, wire)

pytestmark = pytest.mark.asyncio(loop_scope="session")

SEEN: collections.Counter = collections.Counter()     # status codes the fuzzing produced, per RPC
NAMESPACE, OTHER_NAMESPACE = "fuzz", "fuzz-b"
VICTIM_NAMESPACE = "fuzz:victim"      # a tenant no call addressed to NAMESPACE may touch ("fuzz" + ":victim")
VICTIM_PROBE = "<victim>"             # an entry_id the Delete test turns into "victim:<the victim's id>"
CACHE_RESPONSES = {"Lookup": cache_pb2.LookupResponse, "Store": cache_pb2.StoreResponse,
                   "Delete": cache_pb2.DeleteResponse, "Invalidate": cache_pb2.InvalidateResponse,
                   "Stats": cache_pb2.CacheStats}


# ---- strategies
hostile_texts = st.one_of(texts, st.just(MARK))
namespaces = mostly(st.sampled_from([NAMESPACE, OTHER_NAMESPACE]),
                    st.one_of(st.sampled_from(["", " ", "a b", "x" * 65, f"{NAMESPACE}\n", "ÿ", MARK]), texts))
models = mostly(st.just(MODEL), st.one_of(st.sampled_from(["", "m" * 257, MARK]), texts))


@st.composite
def cache_queries(draw) -> tuple[cache_pb2.CacheQuery, bool]:
    """(query, valid): half valid (a lookup of it is answered), half hostile."""
    if draw(st.booleans()):
        q = cache_pb2.CacheQuery(namespace=draw(st.sampled_from([NAMESPACE, OTHER_NAMESPACE])), model=MODEL,
                                 sampling=draw(valid_sampling()))
        if draw(st.booleans()):
            q.prompt = draw(valid_texts)
        else:
            if draw(st.booleans()):
                q.messages.messages.add(role="system", content=draw(valid_texts))
            q.messages.messages.add(role="user", content=draw(valid_texts))
        return q, True
    q = cache_pb2.CacheQuery(namespace=draw(namespaces), model=draw(models), sampling=draw(sampling()))
    kind = draw(st.sampled_from(["prompt", "messages", "none"]))
    if kind == "prompt":
        q.prompt = draw(hostile_texts)
    elif kind == "messages":
        q.messages.messages.extend(draw(st.one_of(messages, st.just([common_pb2.ChatMessage(role="user", content=MARK)]))))
    return q, False


@st.composite
def policies(draw) -> tuple[cache_pb2.LookupPolicy, bool]:
    p = cache_pb2.LookupPolicy()
    semantic, allow_sampled = draw(mostly(st.none(), st.booleans())), draw(mostly(st.none(), st.booleans()))
    min_similarity = draw(st.one_of(floats, st.floats(0.0, 1.0, width=32)))
    if semantic is not None:
        p.semantic = semantic
    if allow_sampled is not None:
        p.allow_sampled = allow_sampled
    if min_similarity is not None:
        p.min_similarity = min_similarity
    return p, not p.HasField("min_similarity") or 0.0 <= p.min_similarity <= 1.0


@st.composite
def lookups(draw) -> tuple[cache_pb2.LookupRequest, bool]:
    (q, q_valid), (p, p_valid) = draw(cache_queries()), draw(policies())
    return cache_pb2.LookupRequest(query=q, policy=p), q_valid and p_valid


@st.composite
def stores(draw) -> tuple[cache_pb2.StoreRequest, bool]:
    q, valid = draw(cache_queries())
    req = cache_pb2.StoreRequest(query=q, allow_sampled=draw(st.booleans()))
    a = req.answer
    a.text = draw(mostly(valid_texts, st.one_of(hostile_texts, st.builds(lambda n: "a" * n, st.sampled_from(
        [999_999, 1_000_000, 1_000_001])))))                  # about the service's 1,000,000-character limit
    a.token_ids.extend(draw(mostly(st.lists(st.integers(0, 49151), max_size=20),
                                   st.lists(st.integers(-2**31, 2**31 - 1), max_size=3000))))
    a.finish_reason = draw(enums)
    counts = mostly(st.integers(0, 4096), st.integers(-2**31, 2**31 - 1))
    a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.cached_prompt_tokens = (draw(counts) for _ in range(3))
    ttl_s = draw(mostly(st.sampled_from([None, 0, 3600]), st.integers(-2**31, 2**31 - 1)))
    if ttl_s is not None:
        req.ttl_s = ttl_s
    valid = (valid and len(a.text) <= 1_000_000 and MARK not in a.text and (ttl_s or 0) >= 0
             and min(a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.cached_prompt_tokens) >= 0)
    return req, valid


entry_ids = mostly(st.sampled_from([VICTIM_PROBE, "0" * 32]),
                   st.one_of(st.sampled_from(["", "x" * 65, "a:b", "*", MARK]), texts))
deletes = st.builds(cache_pb2.DeleteRequest, namespace=namespaces, entry_id=entry_ids)
invalidations = st.builds(cache_pb2.InvalidateRequest, namespace=namespaces,
                          model=mostly(st.sampled_from(["", MODEL]), st.one_of(texts, st.just(MARK))))
stats_requests = st.builds(cache_pb2.StatsRequest, namespace=mostly(st.sampled_from(["", NAMESPACE]), namespaces))
traceparents = mostly(st.sampled_from(["", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]),
                      st.one_of(hostile_texts, st.just("00-" + "f" * 32 + "-" + "0" * 16 + "-ff")))


@st.composite
def lookup_streams(draw) -> list[bytes]:
    """1-8 LookupStreamRequests as sent, with distinct ids >= 1; at most one undecodable item (id 0)."""
    items = draw(st.lists(st.tuples(lookups(), traceparents), min_size=1, max_size=7))
    ids = draw(st.lists(st.integers(1, 2**64 - 1), min_size=len(items), max_size=len(items), unique=True))
    out = [wire(cache_pb2.LookupStreamRequest(id=i, request=req, traceparent=tp))
           for i, ((req, _), tp) in zip(ids, items)]
    if draw(st.booleans()):
        out.insert(draw(st.integers(0, len(out))), draw(garbage))
    return out


# ---- the services
class Services:
    def __init__(self, down, engine, cache_channel, router_channel, victim: cache_pb2.LookupRequest) -> None:
        self.down, self.engine, self.victim = down, engine, victim
        self.cache_channel, self.router_channel = cache_channel, router_channel
        self.victim_id = ""

    def call_cache(self, method: str, data: bytes):
        return raw(self.cache_channel, f"/strata.v1.SemanticCache/{method}", CACHE_RESPONSES[method])(
            data, timeout=CALL_TIMEOUT_S)

    def router(self, method: str, response, streamed: bool = False):
        return raw(self.router_channel, f"/strata.v1.Router/{method}", response, streamed)

    def lookup_stream(self):
        return self.cache_channel.stream_stream("/strata.v1.SemanticCache/LookupStream", request_serializer=None,
                                                response_deserializer=cache_pb2.LookupStreamResponse.FromString)(
            timeout=CALL_TIMEOUT_S)

    async def lookup(self, req: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse:
        return await self.call_cache("Lookup", wire(req))

    async def assert_victim_untouched(self) -> None:
        hit = await self.lookup(self.victim)
        assert hit.hit and hit.entry_id == self.victim_id, "an entry of another namespace was deleted"

    def assert_redis_still_trusted(self) -> None:
        assert self.down.cache.cache.redis_ok, "a bad request made the cache think Redis is down"


@pytest.fixture(scope="module")
async def services(redis_server, make_engine, embedder):
    redis_server.flush()
    engine = make_engine("float32")
    async with running_downstream(redis_server.url, engine, embedder, replica_id="fuzz-cr") as down:
        cch, rch = grpc.aio.insecure_channel(down.cache_address), grpc.aio.insecure_channel(down.router_address)
        victim = cache_pb2.LookupRequest(query=cache_pb2.CacheQuery(
            namespace=VICTIM_NAMESPACE, model=MODEL, prompt="What is the capital of France?",
            sampling=common_pb2.SamplingParams(temperature=0.0)), policy=cache_pb2.LookupPolicy(semantic=False))
        s = Services(down, engine, cch, rch, victim)
        stored = await s.call_cache("Store", wire(cache_pb2.StoreRequest(
            query=victim.query, answer=cache_pb2.CachedAnswer(text="Paris"))))
        s.victim_id = stored.entry_id
        yield s
        await cch.close()
        await rch.close()


def _readable_id(data: bytes) -> int:
    """Field 1 (the id) of a LookupStreamRequest that does not parse; 0 when even that is unreadable."""
    try:
        return wrappers_pb2.UInt64Value.FromString(data).value    # the other fields are unknown to it: skipped
    except DecodeError:
        return 0


def _expected_refusal(data: bytes, namespace: str) -> bool:
    """Text that is not UTF-8, or a namespace outside [A-Za-z0-9_.:-]{1,64}: INVALID_ARGUMENT for sure."""
    return BAD_UTF8 in data or NAMESPACE_RE.fullmatch(namespace) is None


# ---- the semantic cache
@SETTINGS
@given(case=lookups())
async def test_every_cache_lookup_gets_an_answer_or_a_clear_status(services, case):
    req, valid = case
    code, answer = await outcome(SEEN, "Lookup", lambda: services.lookup(req))
    if _expected_refusal(wire(req), req.query.namespace):
        assert code == INVALID, code
    elif valid:
        assert code == OK, code
    if code == OK and answer.hit:
        assert answer.entry_id and answer.layer != cache_pb2.CACHE_LAYER_UNSPECIFIED, answer
    elif code == OK:
        assert answer.miss_reason in ("not_found", "below_threshold", "not_cacheable"), answer
    services.assert_redis_still_trusted()


@SETTINGS
@given(case=stores())
async def test_every_cache_store_gets_an_answer_or_a_clear_status_and_serves_what_it_stored(services, case):
    req, valid = case
    data = wire(req)
    code, stored = await outcome(SEEN, "Store", lambda: services.call_cache("Store", data))
    if _expected_refusal(data, req.query.namespace):
        assert code == INVALID, code
    elif valid:
        assert code == OK, code
    services.assert_redis_still_trusted()
    if code != OK:
        return
    if not stored.stored:
        assert stored.reason == "not_cacheable" and not req.allow_sampled, stored
        return
    if req.HasField("ttl_s") and 0 < req.ttl_s < 60:
        return                                    # may be gone already
    SEEN["Store", "stored"] += 1
    hit = await services.lookup(cache_pb2.LookupRequest(query=req.query, policy=cache_pb2.LookupPolicy(
        semantic=False, allow_sampled=req.allow_sampled)))
    assert hit.hit and hit.layer == cache_pb2.CACHE_LAYER_EXACT and hit.entry_id == stored.entry_id, hit
    got, sent = hit.answer, req.answer
    assert (got.text, list(got.token_ids), got.finish_reason) == (sent.text, list(sent.token_ids), sent.finish_reason)
    assert got.usage == sent.usage


@settings(SETTINGS, max_examples=70)
@given(req=st.one_of(deletes, invalidations))
async def test_every_cache_delete_and_invalidate_gets_an_answer_or_a_clear_status_within_its_namespace(services, req):
    method = type(req).__name__.removesuffix("Request")
    if method == "Delete" and req.entry_id == VICTIM_PROBE:     # "fuzz" + ":victim:<id>" spells the victim's key
        req.namespace, req.entry_id = NAMESPACE, f"victim:{services.victim_id}"
    data = wire(req)
    code, _ = await outcome(SEEN, method, lambda: services.call_cache(method, data))
    if _expected_refusal(data, req.namespace):
        assert code == INVALID, code
    services.assert_redis_still_trusted()
    await services.assert_victim_untouched()


@SETTINGS
@given(req=stats_requests)
async def test_every_cache_stats_call_gets_an_answer_or_a_clear_status(services, req):
    data = wire(req)
    code, stats = await outcome(SEEN, "Stats", lambda: services.call_cache("Stats", data))
    if BAD_UTF8 in data or (req.namespace and NAMESPACE_RE.fullmatch(req.namespace) is None):
        assert code == INVALID, code
    else:
        assert code == OK and stats.redis_ok and stats.entries >= 0 and stats.decision, (code, stats)


@SETTINGS
@given(items=lookup_streams())
async def test_a_lookup_stream_answers_every_item_as_lookup_would_and_a_bad_one_does_not_end_it(services, items):
    call = services.lookup_stream()
    for data in items:
        await call.write(data)
    await call.done_writing()
    answers = {}
    async for out in call:
        assert out.id not in answers, f"id {out.id} answered twice"
        answers[out.id] = out
    assert await call.code() == OK
    assert len(answers) == len(items)
    for data in items:
        try:
            item = cache_pb2.LookupStreamRequest.FromString(data)
        except DecodeError:                      # undecodable: answered under its id where that much is readable
            out = answers[_readable_id(data)]
            assert out.code == INVALID.value[0] and 0 < len(out.message) <= MAX_DETAILS_CHARS, out
            SEEN["LookupStream", INVALID.name] += 1
            continue
        out = answers[item.id]
        code, unary = await outcome(SEEN, "Lookup", lambda: services.lookup(item.request))
        assert out.code == code.value[0], (out, code)
        assert (out.code == 0) != bool(out.message) and len(out.message) <= MAX_DETAILS_CHARS, out
        if unary is not None and unary.layer == cache_pb2.CACHE_LAYER_EXACT:
            assert out.response.entry_id == unary.entry_id, (out, unary)
        SEEN["LookupStream", grpc.StatusCode.OK.name if out.code == 0 else code.name] += 1
    services.assert_redis_still_trusted()


# ---- the router
@SETTINGS
@given(data=inference_wire_requests())
async def test_every_router_request_gets_an_answer_or_a_clear_status(services, data):
    req = None if BAD_UTF8 in data else inference_pb2.GenerateRequest.FromString(data)
    served = req is None or req.model in ("", MODEL)
    chunks = []

    async def call():
        chunks.extend([c async for c in services.router("Generate", inference_pb2.GenerateChunk, streamed=True)(
            data, timeout=CALL_TIMEOUT_S)])
    code, _ = await outcome(SEEN, "Router.Generate", call)
    if not served and code != INVALID:
        assert code == grpc.StatusCode.NOT_FOUND, code          # a model no replica serves
    if req is None:
        assert code == INVALID, code
    if code == OK:
        assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


@SETTINGS
@given(data=st.one_of(st.binary(max_size=100), garbage))
async def test_router_list_backends_answers_anything_that_parses_and_refuses_the_rest(services, data):
    code, answer = await outcome(SEEN, "Router.ListBackends", lambda: services.router(
        "ListBackends", router_pb2.ListBackendsResponse)(data, timeout=CALL_TIMEOUT_S))
    if not parses(router_pb2.ListBackendsRequest, data):
        assert code == INVALID, code
    else:
        assert code == OK and [b.healthy for b in answer.backends] == [True], (code, answer)


# ---- afterwards
@pytest.mark.parametrize("method", sorted(CACHE_RESPONSES))
async def test_corrupt_wire_data_is_invalid_argument_on_every_unary_cache_rpc(services, method):
    for data in (b"\xff\xff\xff", b"\x0a\x05ab"):                       # wire type 7; a length past the end
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await services.call_cache(method, data)
        assert err.value.code() == INVALID and "does not parse" in err.value.details(), err.value.details()


async def test_a_lookup_streams_error_message_is_capped_like_a_status_message(services):
    q = cache_pb2.CacheQuery(namespace=NAMESPACE, model=MODEL)
    q.messages.messages.add(role="x" * 5000, content="hi")             # the refusal quotes the role
    call = services.lookup_stream()
    await call.write(wire(cache_pb2.LookupStreamRequest(id=7, request=cache_pb2.LookupRequest(query=q))))
    out = await call.read()
    await call.done_writing()
    assert out.id == 7 and out.code == INVALID.value[0] and len(out.message) == MAX_DETAILS_CHARS, out.message[:80]
    assert await call.read() == grpc.aio.EOF and await call.code() == OK


async def test_after_the_fuzzing_everything_still_serves_and_every_block_is_free(services):
    q = cache_pb2.CacheQuery(namespace=NAMESPACE, model=MODEL, prompt="How many legs does a spider have?",
                             sampling=common_pb2.SamplingParams(temperature=0.0))
    stored = await services.call_cache("Store", wire(cache_pb2.StoreRequest(
        query=q, answer=cache_pb2.CachedAnswer(text="Eight."))))
    hit = await services.lookup(cache_pb2.LookupRequest(query=q))
    assert stored.stored and hit.hit and hit.answer.text == "Eight."
    await services.assert_victim_untouched()
    chunks = [c async for c in services.router("Generate", inference_pb2.GenerateChunk, streamed=True)(
        wire(inference_pb2.GenerateRequest(prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=3))),
        timeout=CALL_TIMEOUT_S)]
    assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    await settled(lambda: assert_all_blocks_free(services.engine))

    def router_idle() -> None:
        for b in services.down.router.router.backends.values():  # the request's own faults never count against it
            assert b.in_flight == 0 and b.failures == 0 and b.circuit.state == "closed", vars(b)
    await settled(router_idle)
    for rpc in ("Lookup", "Store", "Delete", "Invalidate", "Stats", "LookupStream", "Router.Generate"):
        assert SEEN[rpc, "OK"] >= 3 and SEEN[rpc, "INVALID_ARGUMENT"] >= 3, SEEN     # answers and refusals
    assert SEEN["Store", "stored"] >= 3 and SEEN["Router.Generate", "NOT_FOUND"] >= 1, SEEN
    print(dict(SEEN))
