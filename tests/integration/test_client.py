"""The Python client (services/client) as a caller sees it: against the real stack (Redis, cache, router,
an inference replica and the gateway, all on port 0) and, for retries, against a tiny strata.v1.Gateway
that fails on command. Every behaviour is checked with the sync client (in a thread) and the asyncio one."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.client import (
    AsyncStrataClient,
    AuthError,
    CallTimeoutError,
    Chunk,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    Result,
    RetryPolicy,
    ServiceUnavailableError,
    StrataClient,
    StrataClientError,
)
from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.main import GatewayService, GatewayServiceConfig
from services.gateway.config import GatewayConfig, ModelPrice
from tests.integration.downstream import running_downstream

pytestmark = pytest.mark.asyncio(loop_scope="session")
ADMIN = "admin-token-for-tests"
PEPPER = "pepper-for-tests-0123456789"
MODEL = "SmolLM2-135M-Instruct"
FAST_RETRY = RetryPolicy(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.05)
FLAVORS = pytest.mark.parametrize("flavor", ["sync", "async"])


# -- running either client the same way ---------------------------------------------------------------

async def generate(flavor: str, target: str, key: str, prompt, client: dict | None = None, **kw) -> Result:
    """One `generate` with a fresh client: the asyncio one on this loop, the sync one in a thread."""
    if flavor == "async":
        async with AsyncStrataClient(target, key, **(client or {})) as c:
            return await c.generate(prompt, **kw)

    def run() -> Result:
        with StrataClient(target, key, **(client or {})) as c:
            return c.generate(prompt, **kw)
    return await asyncio.to_thread(run)


async def stream(flavor: str, target: str, key: str, prompt, client: dict | None = None,
                 **kw) -> tuple[list[Chunk], StrataClientError | None]:
    """The chunks a `stream` yielded, and the error that ended it (None: it finished)."""
    chunks: list[Chunk] = []
    if flavor == "async":
        async with AsyncStrataClient(target, key, **(client or {})) as c:
            try:
                async for chunk in c.stream(prompt, **kw):
                    chunks.append(chunk)
            except StrataClientError as exc:
                return chunks, exc
        return chunks, None

    def run() -> tuple[list[Chunk], StrataClientError | None]:
        with StrataClient(target, key, **(client or {})) as c:
            try:
                for chunk in c.stream(prompt, **kw):
                    chunks.append(chunk)
            except StrataClientError as exc:
                return chunks, exc
        return chunks, None
    return await asyncio.to_thread(run)


# -- the real stack -----------------------------------------------------------------------------------

class Stack:
    def __init__(self, embedder, redis_url: str, router: str, cache: str) -> None:
        self.embedder, self.redis_url, self.router, self.cache = embedder, redis_url, router, cache
        self.stops = []
        self.channels = []

    async def gateway(self, **cfg) -> tuple[str, gateway_pb2_grpc.GatewayAdminStub]:
        """A gateway on port 0: its address and an admin stub (to create keys)."""
        svc = GatewayService(GatewayServiceConfig(GatewayConfig(**cfg), self.redis_url, self.router, self.cache,
                                                  PEPPER, ADMIN), embedder=self.embedder)
        port = await svc.start()
        self.stops.append(svc.stop)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(ch)
        return f"127.0.0.1:{port}", gateway_pb2_grpc.GatewayAdminStub(ch)


@pytest.fixture()
async def stack(redis_url, make_engine, embedder):
    async with running_downstream(redis_url, make_engine("float32"), embedder) as down:
        s = Stack(embedder, redis_url, down.router_address, down.cache_address)
        yield s
        for ch in s.channels:
            await ch.close()
        for stop in reversed(s.stops):
            await stop(0)


async def new_key(admin: gateway_pb2_grpc.GatewayAdminStub, **kw) -> str:
    kw.setdefault("tenant", "acme")
    resp = await admin.CreateKey(gateway_pb2.CreateKeyRequest(**kw), metadata=(("authorization", f"Bearer {ADMIN}"),))
    return resp.key


@FLAVORS
async def test_answers_are_typed_and_a_cached_answer_streams_back_naming_its_source(stack, flavor):
    target, admin = await stack.gateway()
    key = await new_key(admin)
    question = [{"role": "user", "content": "Name three colors."}]
    first = await generate(flavor, target, key, question, model=MODEL, max_tokens=12, temperature=0.0,
                           ignore_eos=True, timeout=60)
    assert first.finish_reason == "length" and len(first.token_ids) == 12 and first.text
    assert first.usage.completion_tokens == 12 and first.usage.prompt_tokens > 0
    assert (first.source.kind, first.source.model, first.source.replica) == ("model", MODEL, "r-1")
    assert first.flags == () and first.mean_logprob is None and first.request_id

    # the same question as (role, content) tuples: the same request, so the cache's exact layer answers
    chunks, error = await stream(flavor, target, key, [("user", "Name three colors.")], model=MODEL, max_tokens=12,
                                 temperature=0.0, ignore_eos=True)
    assert error is None and len(chunks) > 1 and "".join(c.text for c in chunks) == first.text
    assert all(c.finish_reason is None and c.usage is None and c.source is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "length" and last.source.kind == "cache_exact" and last.source.entry_id
    assert last.usage.completion_tokens == 0

    again = await generate(flavor, target, key, question, client={"model": MODEL}, cache="bypass", max_tokens=12,
                           temperature=0.0, ignore_eos=True)
    assert again.source.kind == "model" and again.text == first.text


@FLAVORS
async def test_a_prompt_string_streams_from_the_model(stack, flavor):
    target, admin = await stack.gateway()
    key = await new_key(admin)
    chunks, error = await stream(flavor, target, key, "Once upon a time", max_tokens=8, temperature=0.0,
                                 ignore_eos=True, cache="bypass", priority=1)
    assert error is None and sum(len(c.token_ids) for c in chunks) == 8
    assert chunks[-1].source.kind == "model" and chunks[-1].usage.completion_tokens == 8


@FLAVORS
async def test_logprobs_and_samples_come_back_typed(stack, flavor):
    target, admin = await stack.gateway()
    key = await new_key(admin)
    one = await generate(flavor, target, key, "Once upon a time", max_tokens=5, temperature=0.0, ignore_eos=True,
                         logprobs=2, user="u-7")
    assert [lp.token_id for lp in one.logprobs] == list(one.token_ids)
    assert b"".join(lp.token for lp in one.logprobs).decode() == one.text and one.choices == ()
    assert all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in one.logprobs)
    three = await generate(flavor, target, key, "Once upon a time", max_tokens=5, temperature=1.0, seed=1, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2] and three.text == three.choices[0].text
    assert three.usage.completion_tokens == sum(len(c.token_ids) for c in three.choices)
    chunks, error = await stream(flavor, target, key, "Once upon a time", max_tokens=5, temperature=1.0, seed=1, n=3)
    assert error is None and {c.index for c in chunks if c.finish_reason} == {0, 1, 2}
    assert {i: "".join(c.text for c in chunks if c.index == i) for i in range(3)} == {c.index: c.text for c in three.choices}


@FLAVORS
async def test_an_expired_deadline_raises_deadline_exceeded(stack, flavor):
    target, admin = await stack.gateway()
    key = await new_key(admin)
    long_answer = {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True, "cache": "bypass"}
    with pytest.raises(CallTimeoutError) as err:
        await generate(flavor, target, key, "Tell me a long story.", timeout=0.2, **long_answer)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    chunks, error = await stream(flavor, target, key, "Tell me a long story.", client={"timeout": 0.5}, **long_answer)
    assert isinstance(error, CallTimeoutError) and len(chunks) < 400


@FLAVORS
async def test_request_errors_are_typed_and_the_key_never_shows(stack, flavor):
    target, admin = await stack.gateway(models={MODEL: ModelPrice(), "SmolLM2-large": ModelPrice()})
    bad = "sk-strata-000000000000-" + "x" * 43
    with pytest.raises(AuthError) as err:
        await generate(flavor, target, bad, "Hi", max_tokens=2)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and bad not in str(err.value)
    with StrataClient(target, bad) as c:
        assert bad not in repr(c) and "api_key=<hidden>" in repr(c)
    key = await new_key(admin, models=[MODEL])
    with pytest.raises(AuthError) as err:
        await generate(flavor, target, key, "Hi", model="SmolLM2-large", max_tokens=2)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "may not use model" in err.value.details
    _, error = await stream(flavor, target, key, "Hi", model="gpt-9", max_tokens=2)
    assert isinstance(error, NotFoundError) and isinstance(error, InvalidRequestError)
    assert error.code == grpc.StatusCode.NOT_FOUND


@FLAVORS
async def test_a_rate_limit_raises_rate_limited_with_retry_after(stack, flavor):
    target, admin = await stack.gateway()
    key = await new_key(admin, limits=gateway_pb2.KeyLimits(requests_per_minute=1))
    assert (await generate(flavor, target, key, "Hi", max_tokens=2)).usage.completion_tokens >= 1
    with pytest.raises(RateLimitedError) as err:
        await generate(flavor, target, key, "Hi again", max_tokens=2)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.retry_after_s >= 1
    chunks, error = await stream(flavor, target, key, "And again", max_tokens=2)
    assert not chunks and isinstance(error, RateLimitedError) and error.retry_after_s >= 1


# -- retries, against a gateway that fails on command ---------------------------------------------------

def final_chunk(text: str) -> gateway_pb2.GatewayChunk:
    return gateway_pb2.GatewayChunk(
        request_id="req-1", text=text, token_ids=[3], finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=3),
        source=common_pb2.Source(kind=common_pb2.Source.KIND_MODEL, model="fake", replica="f-1"))


class FlakyGateway:
    """strata.v1.Gateway answering "hello world" (in 3 chunks when streamed), except that its first
    `fail_first` calls end with `code` (and `trailing` metadata), and a stream with `fail_after_chunks`
    set ends with UNAVAILABLE after that many chunks."""

    def __init__(self, fail_first: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 trailing: tuple = (), fail_after_chunks: int | None = None) -> None:
        self.fail_first, self.code, self.trailing = fail_first, code, trailing
        self.fail_after_chunks = fail_after_chunks
        self.calls = 0
        self.requests: list[gateway_pb2.GatewayRequest] = []
        self.metadata: list[dict] = []

    async def _enter(self, request: gateway_pb2.GatewayRequest, context: grpc.aio.ServicerContext) -> None:
        self.calls += 1
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.calls <= self.fail_first:
            context.set_trailing_metadata(self.trailing)
            await context.abort(self.code, f"failing call {self.calls} on purpose")

    async def generate(self, request, context):
        await self._enter(request, context)
        return gateway_pb2.GatewayResponse(request_id="req-1", text="hello world", token_ids=[1, 2, 3],
                                           finish_reason=common_pb2.FINISH_REASON_STOP, mean_logprob=-0.5,
                                           usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=3),
                                           source=common_pb2.Source(kind=common_pb2.Source.KIND_MODEL, model="fake"))

    async def generate_stream(self, request, context):
        await self._enter(request, context)
        for i, text in enumerate(("hel", "lo")):
            yield gateway_pb2.GatewayChunk(request_id="req-1", text=text, token_ids=[i + 1])
            if self.fail_after_chunks == i + 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away mid-answer")
        yield final_chunk(" world")

    def handler(self) -> grpc.GenericRpcHandler:
        req, resp, chunk = gateway_pb2.GatewayRequest, gateway_pb2.GatewayResponse, gateway_pb2.GatewayChunk
        return grpc.method_handlers_generic_handler("strata.v1.Gateway", {
            "Generate": grpc.unary_unary_rpc_method_handler(
                self.generate, request_deserializer=req.FromString, response_serializer=resp.SerializeToString),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self.generate_stream, request_deserializer=req.FromString, response_serializer=chunk.SerializeToString),
        })


@pytest.fixture()
async def flaky():
    """flaky(**FlakyGateway args) -> (address, gateway): a FlakyGateway on port 0."""
    servers = []

    async def start(**kw) -> tuple[str, FlakyGateway]:
        gateway = FlakyGateway(**kw)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((gateway.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", gateway
    yield start
    for server in servers:
        await server.stop(0)


@FLAVORS
async def test_unavailable_is_retried_until_the_answer(flaky, flavor):
    target, gw = await flaky(fail_first=2)
    out = await generate(flavor, target, "sk-test", "Hi", client={"retry": FAST_RETRY})
    assert (out.text, out.finish_reason, out.mean_logprob, gw.calls) == ("hello world", "stop", -0.5, 3)


@FLAVORS
async def test_retries_stop_at_max_attempts(flaky, flavor):
    target, gw = await flaky(fail_first=10)
    with pytest.raises(ServiceUnavailableError) as err:
        await generate(flavor, target, "sk-test", "Hi", client={"retry": FAST_RETRY})
    assert gw.calls == 3 and "failing call 3" in err.value.details
    target, gw = await flaky(fail_first=10)
    _, error = await stream(flavor, target, "sk-test", "Hi", client={"retry": RetryPolicy(max_attempts=1)})
    assert isinstance(error, ServiceUnavailableError) and gw.calls == 1


@FLAVORS
async def test_a_stream_is_retried_before_its_first_chunk(flaky, flavor):
    target, gw = await flaky(fail_first=2)
    chunks, error = await stream(flavor, target, "sk-test", "Hi", client={"retry": FAST_RETRY})
    assert error is None and gw.calls == 3
    assert [c.text for c in chunks] == ["hel", "lo", " world"] and chunks[-1].finish_reason == "stop"
    assert chunks[-1].source.replica == "f-1" and chunks[-1].usage.completion_tokens == 3


@FLAVORS
async def test_a_stream_failing_after_a_chunk_raises_and_never_restarts_the_answer(flaky, flavor):
    target, gw = await flaky(fail_after_chunks=1)
    chunks, error = await stream(flavor, target, "sk-test", "Hi", client={"retry": FAST_RETRY})
    assert [c.text for c in chunks] == ["hel"] and gw.calls == 1
    assert isinstance(error, ServiceUnavailableError) and "mid-answer" in error.details


@FLAVORS
async def test_resource_exhausted_is_not_retried_and_carries_retry_after(flaky, flavor):
    target, gw = await flaky(fail_first=10, code=grpc.StatusCode.RESOURCE_EXHAUSTED, trailing=(("retry-after", "7"),))
    with pytest.raises(RateLimitedError) as err:
        await generate(flavor, target, "sk-test", "Hi", client={"retry": FAST_RETRY})
    assert err.value.retry_after_s == 7.0 and gw.calls == 1
    _, error = await stream(flavor, target, "sk-test", "Hi", client={"retry": FAST_RETRY})
    assert isinstance(error, RateLimitedError) and error.retry_after_s == 7.0 and gw.calls == 2


@FLAVORS
async def test_one_deadline_covers_every_attempt(flaky, flavor):
    target, gw = await flaky(fail_first=1000)
    patient = RetryPolicy(max_attempts=1000, backoff_base_s=0.02, backoff_max_s=0.05)
    start = time.monotonic()
    with pytest.raises((ServiceUnavailableError, CallTimeoutError)):
        await generate(flavor, target, "sk-test", "Hi", client={"retry": patient}, timeout=0.5)
    assert time.monotonic() - start < 2.0 and 3 <= gw.calls < 1000


@FLAVORS
async def test_the_request_carries_the_key_and_only_the_arguments_passed(flaky, flavor):
    target, gw = await flaky()
    await generate(flavor, target, "sk-strata-abc", [("system", "Be brief."), ("user", "Hi")], model="m1",
                   cache="refresh", priority=2, allow_sampled_cache=True, temperature=0.7, max_tokens=5, stop="\n")
    req = gw.requests[0]
    assert gw.metadata[0]["authorization"] == "Bearer sk-strata-abc"
    assert [(m.role, m.content) for m in req.messages.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert (req.model, req.cache_policy, req.priority, req.allow_sampled_cache) == (
        "m1", common_pb2.CACHE_POLICY_REFRESH, 2, True)
    assert req.sampling.max_tokens == 5 and list(req.sampling.stop) == ["\n"]
    assert req.sampling.temperature == pytest.approx(0.7)
    assert not any(req.sampling.HasField(f) for f in ("top_p", "top_k", "seed", "min_tokens", "logprobs"))
    await generate(flavor, target, "sk-strata-abc", "Hi")
    assert gw.requests[1].prompt == "Hi" and not gw.requests[1].HasField("sampling")
    assert gw.requests[1].cache_policy == common_pb2.CACHE_POLICY_UNSPECIFIED
    fmt = common_pb2.ResponseFormat
    for given, expected in (("json_object", fmt(type=fmt.TYPE_JSON_OBJECT)),
                            ({"type": "json_schema", "schema": {"type": "object"}, "strict": True},
                             fmt(type=fmt.TYPE_JSON_SCHEMA, spec='{"type": "object"}', strict=True)),
                            ({"type": "json_schema", "json_schema": {"name": "x", "schema": '{"type": "string"}'}},
                             fmt(type=fmt.TYPE_JSON_SCHEMA, spec='{"type": "string"}')),
                            ({"type": "regex", "regex": "[ab]+"}, fmt(type=fmt.TYPE_REGEX, spec="[ab]+")),
                            ({"type": "grammar", "grammar": 'root ::= "x"'}, fmt(type=fmt.TYPE_GRAMMAR, spec='root ::= "x"'))):
        await generate(flavor, target, "sk-strata-abc", "Hi", response_format=given)
        assert gw.requests[-1].sampling.response_format == expected, given


async def test_bad_arguments_fail_before_any_call():
    with StrataClient("127.0.0.1:1", "sk-test") as c:
        with pytest.raises(TypeError, match="tempreature"):
            c.generate("Hi", tempreature=0.0)
        with pytest.raises(ValueError, match="cache must be one of"):
            c.stream("Hi", cache="sometimes")
        with pytest.raises(ValueError, match="response_format must be"):
            c.generate("Hi", response_format={"type": "json_schema"})
    with pytest.raises(ValueError):
        StrataClient("127.0.0.1:1", "")
