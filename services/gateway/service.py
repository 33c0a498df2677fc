"""The gateway's request pipeline over its own types (no protobuf, no grpc): a front door (the gRPC
servicer, later an HTTP one) hands it a `Request` and a bearer key and relays its `Chunk`s.

Order for each request: capacity (max_in_flight, before any work) → admit: API key → validation →
PII redaction (or refusal) → injection screen → budget → limits reserved (estimated prompt + max_tokens)
→ cache lookup (a hit is replayed) → route: the router → settle: usage, limits reconciled with the
tokens really used, cache store. Nothing after redaction ever sees the original text: the cache, the
router, Redis and the logs get the redacted prompt. A stream that ends early is still reconciled
(charged what it used) and is never stored in the cache. Stages: services/gateway/stages/.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import AsyncIterator, Iterator, Sequence

import numpy as np

from opentelemetry import trace

from services.common import telemetry
from services.common.errors import ResourceExhaustedError, StrataError, UnavailableError
from services.common.metrics import GatewayMetrics
from services.gateway.backends import Backends
from services.gateway.budgets import TenantBudgets
from services.gateway.config import GatewayConfig
from services.gateway.directory import ModelDirectory
from services.gateway.errors import CapacityError
from services.gateway.guardrails import InjectionSimilarity
from services.gateway.keys import KeyStore
from services.gateway.limits import RateLimiter
from services.gateway.stages.admit import Admit, JobCall
from services.gateway.stages.auth import Authenticator
from services.gateway.stages.cache import CacheStage
from services.gateway.stages.guard import Guard
from services.gateway.stages.route import Generation, Route
from services.gateway.stages.settle import Settle
from services.gateway.types import Choice, Chunk, FinishReason, Request, Result, SourceKind
from services.gateway.usage import UsageStore


EMBEDDING_SOURCE = "embedding"          # the metrics' source label of Embed calls


@dataclass(slots=True)
class _Call:
    """A call's labels in the metrics."""

    source: str                           # SourceKind (a StrEnum: its value is the label) or "embedding"
    code: str = "OK"


@dataclass(slots=True)
class Embeddings:
    """An Embed call's answer."""

    request_id: str
    model: str
    vectors: np.ndarray                   # [n, dim] float32, unit rows, in the input's order
    prompt_tokens: int                    # every token the model read (what the key is charged)


class Gateway:
    def __init__(self, config: GatewayConfig, keys: KeyStore, limiter: RateLimiter, usage: UsageStore,
                 backends: Backends, similarity: InjectionSimilarity | None = None,
                 tracer: trace.Tracer | None = None, metrics: GatewayMetrics | None = None,
                 directory: ModelDirectory | None = None, tenants: TenantBudgets | None = None) -> None:
        self.config = config
        self.tracer = tracer or telemetry.tracer("gateway")
        self.metrics = metrics or GatewayMetrics()
        self.authenticator = Authenticator(config, keys)
        self.directory = directory           # the models' replicas, capabilities and load (None: not known)
        self.admit = Admit(config, self.authenticator, Guard(config, similarity), limiter, usage, self.tracer,
                           self.metrics, directory, tenants)
        self.cache = CacheStage(backends, self.tracer, config.replay_chunk_words)
        self.route = Route(backends, self.tracer, config.cascades.keys(), config.redact_responses)
        self.settle = Settle(config, limiter, usage, self.metrics, self.cache)
        self.backends = backends
        self.in_flight = 0

    async def stream(self, request: Request, bearer: str, client: str = "",
                     timeout_s: float | None = None, job: JobCall | None = None) -> AsyncIterator[Chunk]:
        """The answer as chunks; the last one says where it came from. `client` is the caller's address
        (failed key attempts are limited per address). Counted in the metrics by outcome and source. `job`: a
        background job's item (its key instead of the bearer; its usage kept in it for the job's worker)."""
        with self._counted() as call:
            a = await self.admit(request, bearer, client, job)
            gen = Generation()
            settled = False
            try:
                # cache
                hit = await self.cache.lookup(a)
                if hit is not None:
                    for chunk in self.cache.replay(hit, a):
                        if chunk.finish is not None:
                            call.source = chunk.finish.source.kind
                        yield chunk
                    await self.settle.charge(a, 0, 0, cache_hit=True)
                    settled = True
                    return
                # route
                async for chunk in self.route.stream(a, gen, timeout_s):
                    if chunk.finish is not None:
                        call.source = chunk.finish.source.kind
                    yield chunk
                # settle
                usage = gen.final.usage
                await self.settle.charge(a, usage.prompt_tokens, usage.completion_tokens,
                                         answered_by=gen.final.source.model)
                settled = True
                await self.settle.answered(a, gen)
            finally:
                if not settled:           # failed or cut short: charge what was used, free the slot
                    await self.settle.charge(a, gen.prompt_tokens, gen.completion_tokens, count=False)

    async def generate(self, request: Request, bearer: str, client: str = "",
                       timeout_s: float | None = None, job: JobCall | None = None) -> Result:
        """Unary: the whole answer. A configured cascade re-asks its larger model once when the model's
        answer has a mean token log-probability under the threshold (cached answers are never re-asked, nor
        a chat request to a larger model that serves completions only). The answer's source then says
        `cascade:<first model>` and its flags `cascade:<first>-><larger>`; both answers are charged."""
        out = await _collect(self.stream(request, bearer, client, timeout_s, job))
        first = out.finish
        cascade = self.config.cascades.get(first.source.model)
        if (cascade is not None and first.source.kind is SourceKind.MODEL and first.mean_logprob is not None
                and request.samples == 1
                and first.mean_logprob < cascade.min_mean_logprob
                and self.admit.able(cascade.to, request.messages is not None)):
            out = await _collect(self.stream(replace(request, model=cascade.to), bearer, client, timeout_s, job))
            flags = (*out.finish.flags, f"cascade:{first.source.model}->{cascade.to}")
            source = replace(out.finish.source, route=f"cascade:{first.source.model}")
            out = replace(out, finish=replace(out.finish, flags=flags, source=source))
        return out

    async def embed(self, model: str, texts: Sequence[str], bearer: str, client: str = "", truncate: bool = False,
                    timeout_s: float | None = None, user: str = "") -> Embeddings:
        """Sentence embeddings from the semantic cache's model: capacity, then the key, its models and tier, the
        input's bounds, the budget and the limits (Admit.embedding), then the model, then usage (the tokens the
        model read, at the embedding model's price). Counted in the metrics with source "embedding"."""
        with self._counted(EMBEDDING_SOURCE):
            a = await self.admit.embedding(model, texts, bearer, client, user)
            charged = False
            try:
                with telemetry.child_span(self.tracer, "embed") as span:
                    span.set_attribute("strata.inputs", len(texts))
                    out = await self.backends.embed(texts, truncate, timeout_s)
                    tokens = sum(out.tokens)
                    span.set_attribute("strata.tokens", tokens)
                await self.settle.charge_embedding(a, tokens)
                charged = True
            finally:
                if not charged:               # failed: nothing used, the reservation ends
                    await self.settle.charge_embedding(a, 0, count=False)
            return Embeddings(a.request_id, a.model, out.vectors, tokens)

    @contextmanager
    def _counted(self, source: str = SourceKind.NONE) -> Iterator[_Call]:
        """One call to the gateway: refused at once past max_in_flight (before any work: no key lookup, no Redis,
        no model), counted in flight, and in the metrics by outcome and source (the caller may set the source
        once it is known; a SourceKind is its label) with its latency when it succeeded."""
        t0 = time.perf_counter()
        call = _Call(source)
        self.in_flight += 1
        try:
            cap = self.config.max_in_flight
            if cap and self.in_flight > cap:
                raise CapacityError(f"the gateway is at capacity ({cap} requests in flight)", retry_after_s=1.0)
            yield call
        except StrataError as exc:
            call.code = exc.status
            if isinstance(exc, ResourceExhaustedError):
                self.metrics.ratelimit_rejections.labels(getattr(exc, "limit", "budget")).inc()
            raise
        except BaseException:
            call.code = "CANCELLED"
            raise
        finally:
            self.in_flight -= 1
            self.metrics.requests.labels(call.code, call.source).inc()
            if call.code == "OK":
                self.metrics.latency.labels(call.source).observe(time.perf_counter() - t0)

    async def close(self) -> None:
        await self.settle.close()
        if self.directory is not None:
            await self.directory.close()


async def _collect(chunks: AsyncIterator[Chunk]) -> Result:
    request_id, finish = "", None
    text: dict[int, list[str]] = {}
    token_ids: dict[int, list[int]] = {}
    calls: dict[int, list] = {}
    logprobs: dict[int, list] = {}
    reasons: dict[int, FinishReason] = {}
    flags: dict[str, None] = {}                   # every sample's findings, in order
    async for c in chunks:
        request_id = c.request_id
        text.setdefault(c.index, []).append(c.text)
        token_ids.setdefault(c.index, []).extend(c.token_ids)
        calls.setdefault(c.index, []).extend(c.tool_calls)
        logprobs.setdefault(c.index, []).extend(c.logprobs)
        if c.finish is not None:
            finish = c.finish
            reasons[c.index] = c.finish.reason
            flags.update(dict.fromkeys(c.finish.flags))
    if finish is None or len(reasons) < len(text):
        raise UnavailableError("the answer ended without its final chunk")
    choices = tuple(Choice(i, "".join(text[i]), token_ids[i], reasons[i], tuple(calls[i]), tuple(logprobs[i]))
                    for i in sorted(text))
    first = choices[0]
    # the last finish has the request's usage and source; its reason is sample 0's, its flags every sample's
    finish = replace(finish, reason=first.reason, flags=tuple(flags))
    return Result(request_id, first.text, first.token_ids, finish, first.tool_calls, first.logprobs, choices)
