"""The gateway's pipeline called the way a second front door would: the gateway's own Request in, its Chunks
and Result out, no gRPC servicer in between, with an in-memory cache and router behind it. The router
request the adapter builds from what the pipeline asks is the caller's sampling with max_tokens filled in."""

from __future__ import annotations

from typing import AsyncIterator

import pytest

from services.common.errors import ResourceExhaustedError, UnauthenticatedError
from services.common.pb import common_pb2, inference_pb2
from services.gateway.backends import Answer, CacheHit, CacheQuery, ModelChunk, ModelRequest
from services.gateway.clients import model_request_to_pb
from services.gateway.config import GatewayConfig, ModelPrice
from services.gateway.keys import ApiKey
from services.gateway.selection import Cascade
from services.gateway.service import Gateway
from services.gateway.translate import sampling_from_pb
from services.gateway.types import (CachePolicy, Finish, FinishReason, Message, Request, Sampling, Source,
                                    SourceKind, Usage)

KEY = "sk-strata-good"


class Keys:
    prefix, redis = "strata:gw:", None

    def __init__(self) -> None:
        self.lookups = 0

    async def authenticate(self, bearer: str) -> ApiKey:
        self.lookups += 1
        if bearer != KEY:
            raise UnauthenticatedError("invalid API key")
        return ApiKey("0123456789ab", "acme")


class Ledger:
    def __init__(self) -> None:
        self.records: list[tuple] = []

    async def record(self, key_id, prompt_tokens, completion_tokens, spend_usd, cache_hit, answered=True) -> None:
        self.records.append((prompt_tokens, completion_tokens, cache_hit, answered))


class InMemoryBackends:
    """A cache holding at most one answer, and a router answering every request with `words`."""

    def __init__(self, words: list[str], logprob: float = -0.1, hit: CacheHit | None = None) -> None:
        self.words, self.logprob, self.hit = words, logprob, hit
        self.asked: list[ModelRequest] = []
        self.stored: list[tuple[CacheQuery, Answer]] = []

    async def find(self, query: CacheQuery, allow_sampled: bool) -> CacheHit | None:
        return self.hit

    async def store(self, query: CacheQuery, answer: Answer, allow_sampled: bool) -> bool:
        self.stored.append((query, answer))
        return True

    async def generate(self, request: ModelRequest, timeout_s: float | None) -> AsyncIterator[ModelChunk]:
        self.asked.append(request)
        for i, w in enumerate(self.words):
            last = i == len(self.words) - 1
            finish = Finish(FinishReason.STOP, Usage(3, len(self.words)), Source(SourceKind.MODEL, request.model, "r-1"))
            lp = [self.logprob] if request.sampling.logprobs is not None else []
            yield ModelChunk(w, (i,), 3 if i == 0 else 0, lp, finish if last else None)


def gateway(backends: InMemoryBackends, **config) -> tuple[Gateway, Ledger, Keys]:
    usage, keys = Ledger(), Keys()
    cfg = GatewayConfig(models={"small": ModelPrice(), "large": ModelPrice()}, **config)
    return Gateway(cfg, keys, None, usage, backends), usage, keys


def ask(text: str = "Say hi", **kw) -> Request:
    kw.setdefault("model", "small")
    return Request(messages=(Message("user", text),), sampling=Sampling(temperature=0.0, max_tokens=4), **kw)


async def test_a_streamed_answer_ends_with_its_source_and_is_charged_and_stored():
    down = InMemoryBackends(["Hello", " there"])
    gw, usage, _ = gateway(down)
    chunks = [c async for c in gw.stream(ask("Mail jane.doe@example.com"), KEY)]
    assert "".join(c.text for c in chunks) == "Hello there" and [c.finish is None for c in chunks] == [True, False]
    last = chunks[-1].finish
    assert last.source == Source(SourceKind.MODEL, "small", "r-1") and last.flags == ("pii:EMAIL",)
    assert usage.records == [(3, 2, False, True)]
    query, answer = down.stored[0]
    assert query.messages == (Message("user", "Mail [EMAIL]"),) and answer.text == "Hello there"
    assert down.asked[0].messages == query.messages                  # the router sees only the redacted text


async def test_the_router_request_is_the_callers_sampling_with_max_tokens_filled_in():
    down = InMemoryBackends(["ok"])
    gw, _, _ = gateway(down, default_max_tokens=7)
    sampling = common_pb2.SamplingParams(temperature=0.0, seed=0, stop=["\n"])
    await gw.generate(Request(model="small", prompt="Say hi", sampling=sampling_from_pb(sampling), priority=2), KEY)
    expected = inference_pb2.GenerateRequest(request_id=down.asked[0].request_id, model="small", sampling=sampling,
                                             priority=2, prompt="Say hi")
    expected.sampling.max_tokens = 7
    assert model_request_to_pb(down.asked[0]).SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True)


async def test_a_cache_hit_is_replayed_in_word_chunks_and_costs_no_model_tokens():
    hit = CacheHit(SourceKind.CACHE_SEMANTIC, "e-1", "one two three four five six", (9, 9), None)
    down = InMemoryBackends(["unused"], hit=hit)
    gw, usage, _ = gateway(down, replay_chunk_words=4)
    chunks = [c async for c in gw.stream(ask(), KEY)]
    assert [c.text for c in chunks] == ["one two three four ", "five six"] and not down.asked
    assert chunks[-1].finish == Finish(FinishReason.STOP, Usage(), Source(SourceKind.CACHE_SEMANTIC, "small", entry_id="e-1"))
    assert usage.records == [(0, 0, True, True)]
    bypass = await gw.generate(ask(cache_policy=CachePolicy.BYPASS), KEY)
    assert bypass.finish.source.kind is SourceKind.MODEL and not down.stored


@pytest.mark.parametrize("threshold, model", [(0.0, "large"), (-1.0, "small")])
async def test_a_unary_answer_below_the_cascade_threshold_is_asked_again_of_the_larger_model(threshold, model):
    down = InMemoryBackends(["a", "b"], logprob=-0.5)
    gw, _, _ = gateway(down, cascades={"small": Cascade("large", threshold)})
    out = await gw.generate(ask(), KEY)
    assert out.text == "ab" and out.finish.source.model == model
    assert ("cascade:small->large" in out.finish.flags) == (model == "large")
    assert down.asked[0].sampling.logprobs == 0                      # asked for, for the cascade


async def test_past_max_in_flight_a_request_is_refused_before_its_key_is_looked_at():
    gw, _, keys = gateway(InMemoryBackends(["x"]), max_in_flight=1)
    first = gw.stream(ask(), KEY)
    await anext(first)
    with pytest.raises(ResourceExhaustedError, match="at capacity"):
        await gw.generate(ask(), "sk-strata-wrong")
    assert keys.lookups == 1
    await first.aclose()
    assert gw.in_flight == 0
