"""The gateway's pipeline called the way a second front door would: the gateway's own Request in, its Chunks
and Result out, no gRPC servicer in between, with an in-memory cache and router behind it. The router
request the adapter builds from what the pipeline asks is the caller's sampling with max_tokens filled in."""

from __future__ import annotations

from dataclasses import replace
from typing import AsyncIterator

import pytest

from services.common.errors import (InvalidArgumentError, NotFoundError, PermissionDeniedError, ResourceExhaustedError,
                                    UnauthenticatedError)
from services.common.models_file import DEFAULT_TIERS, AutoRule, Cascade, Split
from services.common.pb import common_pb2, inference_pb2
from services.gateway.backends import Answer, CacheHit, CacheQuery, ModelChunk, ModelRequest
from services.gateway.clients import model_request_to_pb
from services.gateway.config import GatewayConfig, ModelPrice
from services.gateway.directory import ModelDirectory, ReplicaView
from services.gateway.keys import ApiKey
from services.gateway.service import Gateway
from services.gateway.translate import sampling_from_pb
from services.gateway.types import (CachePolicy, Finish, FinishReason, Message, Request, Sampling, Source,
                                    SourceKind, TokenLogprob, Usage)

KEY = "sk-strata-good"
# the default tiers without their rate limits (no limit store here)
TIERS = {n: replace(t, requests_per_minute=0, tokens_per_minute=0) for n, t in DEFAULT_TIERS.items()}


class Keys:
    prefix, redis = "strata:gw:", None

    def __init__(self, tier: str = "") -> None:
        self.lookups, self.tier = 0, tier

    async def authenticate(self, bearer: str) -> ApiKey:
        self.lookups += 1
        if bearer != KEY:
            raise UnauthenticatedError("invalid API key")
        return ApiKey("0123456789ab", "acme", tier=self.tier)


class Ledger:
    def __init__(self) -> None:
        self.records: list[tuple] = []
        self.spend: list[float] = []
        self.users: list[str] = []

    async def record(self, key_id, prompt_tokens, completion_tokens, spend_usd, cache_hit, answered=True,
                     user="", tenant="") -> None:
        self.records.append((prompt_tokens, completion_tokens, cache_hit, answered))
        self.users.append(user)
        self.spend.append(spend_usd)


class InMemoryBackends:
    """A cache holding at most one answer, and a router answering every request with `words`."""

    def __init__(self, words: list[str], logprob: float = -0.1, hit: CacheHit | None = None,
                 answered_by: str = "") -> None:
        self.words, self.logprob, self.hit, self.answered_by = words, logprob, hit, answered_by
        self.asked: list[ModelRequest] = []
        self.stored: list[tuple[CacheQuery, Answer]] = []

    async def find(self, query: CacheQuery, allow_sampled: bool) -> CacheHit | None:
        return self.hit

    async def store(self, query: CacheQuery, answer: Answer, allow_sampled: bool) -> bool:
        self.stored.append((query, answer))
        return True

    async def generate(self, request: ModelRequest, timeout_s: float | None) -> AsyncIterator[ModelChunk]:
        """With n > 1, every sample answers `words` (sample k's tokens k*100 + i), their chunks interleaved."""
        self.asked.append(request)
        for i, w in enumerate(self.words):
            for k in range(request.sampling.n or 1):
                last = i == len(self.words) - 1
                finish = Finish(FinishReason.STOP, Usage(3, len(self.words), 2 if k == 0 else 0),
                                Source(SourceKind.MODEL, self.answered_by or request.model, "r-1"))
                lp = [TokenLogprob(i, w.encode(), self.logprob)] if request.sampling.logprobs is not None else []
                yield ModelChunk(w, (k * 100 + i,), 3 if i == 0 and k == 0 else 0, lp, finish if last else None,
                                 index=k)


def gateway(backends: InMemoryBackends, tier: str = "", directory: ModelDirectory | None = None,
            **config) -> tuple[Gateway, Ledger, Keys]:
    usage, keys = Ledger(), Keys(tier)
    config.setdefault("models", {"small": ModelPrice(), "large": ModelPrice()})
    config.setdefault("tiers", TIERS)
    return Gateway(GatewayConfig(**config), keys, None, usage, backends, directory=directory), usage, keys


async def directory(**load: tuple[bool, int]) -> ModelDirectory:
    """The router's view: model -> (serves chat, requests queued), one healthy replica each."""
    async def fetch() -> list[ReplicaView]:
        return [ReplicaView(m, True, chat, waiting * 100, waiting, 1) for m, (chat, waiting) in load.items()]
    d = ModelDirectory(fetch)
    await d.refresh()
    return d


def ask(text: str = "Say hi", **kw) -> Request:
    kw.setdefault("model", "small")
    return Request(messages=(Message("user", text),), sampling=Sampling(temperature=0.0, max_tokens=4), **kw)


async def test_a_streamed_answer_ends_with_its_source_and_is_charged_and_stored():
    down = InMemoryBackends(["Hello", " there"])
    gw, usage, _ = gateway(down)
    chunks = [c async for c in gw.stream(ask("Mail jane.doe@example.com"), KEY)]
    assert "".join(c.text for c in chunks) == "Hello there" and [c.finish is None for c in chunks] == [True, False]
    last = chunks[-1].finish
    assert last.source == Source(SourceKind.MODEL, "small", "r-1", route="named") and last.flags == ("pii:EMAIL",)
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
    assert chunks[-1].finish == Finish(FinishReason.STOP, Usage(), Source(SourceKind.CACHE_SEMANTIC, "small", entry_id="e-1",
                                                                         route="named"))
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


async def test_logprobs_reach_the_caller_only_when_asked_and_bypass_the_cache():
    down = InMemoryBackends(["a", "b"], logprob=-0.5)
    gw, _, _ = gateway(down, cascades={"small": Cascade("large", -1.0)})
    quiet = await gw.generate(ask(), KEY)
    assert quiet.logprobs == () and quiet.finish.mean_logprob == -0.5       # the cascade's own ask stays inside
    asked = Request(model="small", prompt="Say hi", sampling=Sampling(max_tokens=2, logprobs=1))
    out = await gw.generate(asked, KEY)
    assert [(lp.token, lp.logprob) for lp in out.logprobs] == [(b"a", -0.5), (b"b", -0.5)]
    chunks = [c async for c in gw.stream(asked, KEY)]
    assert [lp.token for c in chunks for lp in c.logprobs] == [b"a", b"b"]
    assert len(down.stored) == 1                                             # only the answer without logprobs
    redacting, _, _ = gateway(down, redact_responses=True)
    with pytest.raises(InvalidArgumentError, match="redact"):
        await redacting.generate(asked, KEY)


async def test_samples_are_choices_the_prompt_is_charged_once_and_none_is_cached():
    down = InMemoryBackends(["a", "b"])
    gw, usage, _ = gateway(down, cascades={"small": Cascade("large", 0.0)})
    many = Request(model="small", prompt="Say hi", sampling=Sampling(max_tokens=2, n=3))
    out = await gw.generate(many, KEY)
    assert [(c.index, c.text, list(c.token_ids)) for c in out.choices] == [(k, "ab", [k * 100, k * 100 + 1]) for k in range(3)]
    assert out.text == "ab" and list(out.token_ids) == [0, 1]
    assert out.finish.usage == Usage(3, 6, 2) and usage.records[-1] == (3, 6, False, True)
    assert out.finish.source.model == "small"                               # never re-asked by the cascade
    chunks = [c async for c in gw.stream(many, KEY)]
    finishes = [c for c in chunks if c.finish is not None]
    assert [c.index for c in finishes] == [0, 1, 2]
    assert [c.finish.usage.completion_tokens for c in finishes] == [2, 4, 6]  # the request's so far
    assert not down.stored
    for n in (0, 17):
        with pytest.raises(InvalidArgumentError, match="n must be"):
            await gw.generate(Request(model="small", prompt="x", sampling=Sampling(n=n)), KEY)
    redacting, _, _ = gateway(InMemoryBackends(["mail a@b.io", " ok"]), redact_responses=True)
    out = await redacting.generate(Request(model="small", prompt="x", sampling=Sampling(max_tokens=2, n=2)), KEY)
    assert [c.text for c in out.choices] == ["mail [EMAIL] ok"] * 2


async def test_past_max_in_flight_a_request_is_refused_before_its_key_is_looked_at():
    gw, _, keys = gateway(InMemoryBackends(["x"]), max_in_flight=1)
    first = gw.stream(ask(), KEY)
    await anext(first)
    with pytest.raises(ResourceExhaustedError, match="at capacity"):
        await gw.generate(ask(), "sk-strata-wrong")
    assert keys.lookups == 1
    await first.aclose()
    assert gw.in_flight == 0


async def test_the_model_is_resolved_by_name_default_auto_or_split_and_an_unknown_name_is_not_found():
    """"large" serves completions only (no chat template): chat never goes there unless named, which is refused."""
    d = await directory(small=(True, 0), large=(False, 0))
    cfg = dict(models={"large": ModelPrice(), "small": ModelPrice()}, auto_rules=(AutoRule("large", "long", min_prompt_chars=20),),
               splits={"ab": Split({"large": 1.0, "small": 1.0}, sticky="key")})
    gw, _, _ = gateway(InMemoryBackends(["x"]), directory=d, **cfg)
    prompt = lambda model: Request(model=model, prompt="a long enough prompt to match", sampling=Sampling(max_tokens=2))  # noqa: E731
    assert (await gw.generate(prompt(""), KEY)).finish.source.route == "default"
    assert (await gw.generate(prompt(""), KEY)).finish.source.model == "large"          # the first model
    assert (await gw.generate(ask(model=""), KEY)).finish.source.model == "small"       # the first able to chat
    auto = (await gw.generate(prompt("auto"), KEY)).finish.source
    assert (auto.model, auto.route) == ("large", "auto:long")
    auto = (await gw.generate(ask("a long enough chat message to match", model="auto"), KEY)).finish.source
    assert (auto.model, auto.route) == ("small", "auto:default")                        # the rule's model cannot chat
    split = {(await gw.generate(prompt("ab"), KEY)).finish.source.model for _ in range(8)}
    assert len(split) == 1                                                              # sticky per key
    assert {(await gw.generate(ask(model="ab"), KEY)).finish.source.route for _ in range(4)} == {"split:ab"}
    with pytest.raises(InvalidArgumentError, match="no chat template"):
        await gw.generate(ask(model="large"), KEY)
    with pytest.raises(NotFoundError, match="unknown model 'gpt-9'"):
        await gw.generate(ask(model="gpt-9"), KEY)


async def test_the_tier_caps_the_priority_and_the_models_a_key_may_use():
    down = InMemoryBackends(["x"])
    gw, _, _ = gateway(down, tier="free", model_tiers={"large": ("premium",)})
    await gw.generate(ask(priority=-5), KEY)
    await gw.generate(ask(priority=20), KEY)
    assert [r.priority for r in down.asked] == [10, 20]                 # free: nothing sooner than 10
    with pytest.raises(PermissionDeniedError, match="not open to the 'free' tier"):
        await gw.generate(ask(model="large"), KEY)
    premium, _, _ = gateway(down, tier="premium", model_tiers={"large": ("premium",)})
    await premium.generate(ask(model="large", priority=-5), KEY)
    assert down.asked[-1].priority == -5 and down.asked[-1].model == "large"


async def test_an_overloaded_model_refuses_the_lowest_tiers_first_with_retry_after():
    d = await directory(small=(True, 8), large=(True, 40))     # queued: 8 on small, 40 on large
    for tier, refused in (("free", {"small", "large"}), ("standard", {"large"}), ("premium", set())):
        gw, _, _ = gateway(InMemoryBackends(["x"]), tier=tier, directory=d)
        for model in ("small", "large"):
            if model in refused:
                with pytest.raises(ResourceExhaustedError, match="overloaded") as err:
                    await gw.generate(ask(model=model), KEY)
                assert err.value.retry_after_s == 1.0
            else:
                assert (await gw.generate(ask(model=model), KEY)).text == "x"
        assert gw.metrics.shed.labels(tier, "large")._value.get() == (1 if "large" in refused else 0)


async def test_requests_let_in_since_the_last_view_count_as_in_flight_so_a_burst_is_shed_at_the_limit():
    """A view is up to a poll old: free callers refused together retry together, and a stale view showing an
    idle model let them all in at once. What admission let in since the poll counts until a view includes it."""
    in_flight = {"n": 0}

    async def fetch() -> list[ReplicaView]:
        return [ReplicaView("small", True, True, 0, 0, 0, in_flight["n"])]
    d = ModelDirectory(fetch)
    await d.refresh()
    limit = TIERS["free"].shed_in_flight
    assert limit > 0
    gw, _, _ = gateway(InMemoryBackends(["x"]), tier="free", directory=d)
    for _ in range(limit):
        assert (await gw.generate(ask(), KEY)).text == "x"      # each answered at once: the router's count is 0
    with pytest.raises(ResourceExhaustedError, match=f"{limit} requests in flight"):
        await gw.generate(ask(), KEY)
    in_flight["n"] = 2                                             # a new view: the router counts 2 in flight
    await d.refresh()
    assert d.get("small").in_flight == 2
    for _ in range(limit - 2):
        await gw.generate(ask(), KEY)
    with pytest.raises(ResourceExhaustedError, match="overloaded"):
        await gw.generate(ask(), KEY)
    premium, _, _ = gateway(InMemoryBackends(["x"]), tier="premium", directory=d)
    assert (await premium.generate(ask(), KEY)).text == "x"       # higher tiers are still served


async def test_an_answer_is_charged_at_the_price_of_the_model_that_gave_it():
    prices = {"small": ModelPrice(1.0, 1.0), "large": ModelPrice(10.0, 10.0)}
    gw, usage, _ = gateway(InMemoryBackends(["a", "b"], answered_by="large"), models=prices)
    out = await gw.generate(ask(), KEY)                          # the router fell back to "large"
    assert out.finish.source.route == "named fallback:large"
    assert usage.spend == [pytest.approx((3 + 2) * 10.0 / 1000)]
