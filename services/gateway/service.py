"""The gateway's logic (no grpc): authenticate, validate, guard, limit, consult the cache, route, account.

Order for each request: API key → validation → PII redaction (or refusal) → injection screen → budget
→ limits reserved (estimated prompt + max_tokens) → cache lookup → router → usage, limits reconciled
with the tokens really used, cache store. Nothing after redaction ever sees the original text: the cache,
the router, Redis and the logs get the redacted prompt. A stream that ends early is still reconciled
(charged what it used) and is never stored in the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Mapping

from redis.exceptions import RedisError

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common import telemetry
from services.common.aio import cancel_and_wait
from services.common.errors import (InvalidArgumentError, PermissionDeniedError, ResourceExhaustedError,
                                    StrataError, UnauthenticatedError, UnavailableError)
from services.common.metrics import GatewayMetrics
from services.common.pb import cache_pb2, common_pb2, gateway_pb2, inference_pb2
from services.gateway.clients import CapacityError, Downstream
from services.gateway.guardrails import InjectionSimilarity, redact, screen_injection
from services.gateway.keys import ApiKey, KeyStore
from services.gateway.selection import AutoRule, Cascade, select_model
from services.gateway.limits import LimitExceededError, Limits, RateLimiter, Reservation
from services.gateway.usage import UsageStore, is_utc_day, utc_day

log = logging.getLogger(__name__)
_REDIS_ERRORS = (RedisError, OSError)
PII_MODES = ("off", "redact", "block")
INJECTION_MODES = ("allow", "flag", "block")
_SOURCES = {common_pb2.Source.KIND_MODEL: "model", common_pb2.Source.KIND_CACHE_EXACT: "cache_exact",
            common_pb2.Source.KIND_CACHE_SEMANTIC: "cache_semantic"}
RECONCILE_ATTEMPTS = 6        # a failed limit reconcile is retried after 1, 2, 4, ... 32 s


@dataclass(frozen=True, slots=True)
class ModelPrice:
    usd_per_1k_prompt_tokens: float = 0.0
    usd_per_1k_completion_tokens: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.usd_per_1k_prompt_tokens + completion_tokens * self.usd_per_1k_completion_tokens) / 1000


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    models: Mapping[str, ModelPrice] = field(default_factory=lambda: {"SmolLM2-135M-Instruct": ModelPrice(0.01, 0.02)})
    max_prompt_chars: int = 32_000
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    pii_mode: str = "redact"              # off | redact | block
    redact_responses: bool = False        # also redact answers (a stream then arrives as one chunk)
    injection_mode: str = "flag"          # allow | flag | block
    injection_similarity: float = 0.55    # embedding cosine to a known attack that counts (0 = rules only)
    limits_fail_open: bool = True         # Redis unreachable: serve without limits (True) or refuse (False)
    key_fallback_s: float = 300.0         # Redis unreachable: keys verified this recently are still accepted
    key_cache_s: float = 0.5              # a verified key is trusted this long without asking Redis (so a
                                          # revocation reaches every replica within it)
    auth_failures_per_minute: int = 30    # failed API key attempts a client address may make (0 = no limit)
    max_in_flight: int = 1024             # requests this replica carries at once; more are refused at once with
                                          # RESOURCE_EXHAUSTED + retry-after (0 = no cap)
    replay_chunk_words: int = 4           # a cached answer is streamed in chunks of this many words
    auto_rules: tuple[AutoRule, ...] = () # model "auto": the first matching rule picks the model
    auto_default: str = ""                # ... else this one ("" = the first configured model)
    cascades: Mapping[str, Cascade] = field(default_factory=dict)   # unary Generate only

    def __post_init__(self) -> None:
        if self.pii_mode not in PII_MODES or self.injection_mode not in INJECTION_MODES:
            raise ValueError(f"pii_mode must be one of {PII_MODES}, injection_mode one of {INJECTION_MODES}")
        if not self.models:
            raise ValueError("configure at least one model")
        if self.auth_failures_per_minute < 0:
            raise ValueError("auth_failures_per_minute must be >= 0 (0 = no limit)")
        if self.max_in_flight < 0:
            raise ValueError("max_in_flight must be >= 0 (0 = no cap)")
        named = [r.model for r in self.auto_rules] + [c.to for c in self.cascades.values()] + list(self.cascades)
        unknown = sorted({m for m in named + [self.auto_default] if m and m not in self.models})
        if unknown:
            raise ValueError(f"auto rules and cascades name unconfigured models: {', '.join(unknown)}")


class Gateway:
    def __init__(self, config: GatewayConfig, keys: KeyStore, limiter: RateLimiter, usage: UsageStore,
                 downstream: Downstream, similarity: InjectionSimilarity | None = None,
                 tracer: trace.Tracer | None = None, metrics: GatewayMetrics | None = None) -> None:
        self.config, self.keys, self.limiter, self.usage, self.down = config, keys, limiter, usage, downstream
        self.similarity = similarity
        self.tracer = tracer or telemetry.tracer("gateway")
        self.metrics = metrics or GatewayMetrics()
        self._verified: dict[str, tuple[ApiKey, float]] = {}    # sha256(key) -> (record, verified at)
        self.in_flight = 0
        self._background: set[asyncio.Task] = set()

    # ---- requests
    async def authenticate(self, bearer: str, client: str = "") -> ApiKey:
        """The key's record. A verification is reused for `key_cache_s` (a revocation on another replica
        takes that long to apply; on this one it applies at once); while Redis is unreachable, one within
        `key_fallback_s` stands in, and keys never seen are refused with UNAVAILABLE. A client address
        (`client`, e.g. "ipv4:10.0.0.7") that failed `auth_failures_per_minute` times in its current minute
        gets RESOURCE_EXHAUSTED with retry-after before its key is even looked at, across replicas."""
        digest = hashlib.sha256(bearer.encode()).hexdigest()
        known = self._verified.get(digest)
        now = time.monotonic()
        if known is not None and now - known[1] < self.config.key_cache_s:
            return known[0]
        await self._check_auth_failures(client)
        try:
            key = await self.keys.authenticate(bearer)
        except _REDIS_ERRORS:
            if known is not None and now - known[1] < self.config.key_fallback_s:
                return known[0]
            raise UnavailableError("cannot verify the API key right now (key store unreachable)") from None
        except UnauthenticatedError:
            self._verified.pop(digest, None)
            await self._count_auth_failure(client)
            raise
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[digest] = (key, now)
        return key

    def _auth_failures_key(self, client: str) -> str:
        return f"{self.keys.prefix}authfail:{client}"

    async def _check_auth_failures(self, client: str) -> None:
        if not client or self.config.auth_failures_per_minute <= 0:
            return
        name = self._auth_failures_key(client)
        try:
            failures, ttl = await self.keys.redis.pipeline(transaction=False).get(name).ttl(name).execute()
        except _REDIS_ERRORS:
            return                      # the key check that follows reports the outage
        if failures is not None and int(failures) >= self.config.auth_failures_per_minute:
            raise LimitExceededError("auth_failures", float(max(1, ttl)),
                                     "too many failed API key attempts from this client; retry later")

    async def _count_auth_failure(self, client: str) -> None:
        if not client or self.config.auth_failures_per_minute <= 0:
            return
        name = self._auth_failures_key(client)
        try:
            await self.keys.redis.pipeline(transaction=True).incr(name).expire(name, 60, nx=True).execute()
        except _REDIS_ERRORS:
            pass

    async def revoke_key(self, key_id: str) -> None:
        with _store_unavailable("revoke the key"):
            await self.keys.revoke(key_id)
        for digest in [d for d, (k, _) in self._verified.items() if k.key_id == key_id]:
            del self._verified[digest]

    async def stream(self, req: gateway_pb2.GatewayRequest, bearer: str, timeout_s: float | None = None,
                     client: str = "") -> AsyncIterator[gateway_pb2.GatewayChunk]:
        """The answer as chunks; the last one says where it came from. Counted in the metrics by
        outcome and source."""
        t0 = time.perf_counter()
        code, source = "OK", "none"
        self.in_flight += 1
        try:
            cap = self.config.max_in_flight
            if cap and self.in_flight > cap:        # shed before any work: no key lookup, no Redis, no model
                raise CapacityError(f"the gateway is at capacity ({cap} requests in flight)", retry_after_s=1.0)
            async for chunk in self._stream(req, bearer, timeout_s, client):
                if chunk.HasField("source"):
                    source = _SOURCES.get(chunk.source.kind, "none")
                yield chunk
        except StrataError as exc:
            code = exc.status
            if isinstance(exc, ResourceExhaustedError):
                self.metrics.ratelimit_rejections.labels(getattr(exc, "limit", "budget")).inc()
            raise
        except BaseException:
            code = "CANCELLED"
            raise
        finally:
            self.in_flight -= 1
            self.metrics.requests.labels(code, source).inc()
            if code == "OK":
                self.metrics.latency.labels(source).observe(time.perf_counter() - t0)

    async def _stream(self, req: gateway_pb2.GatewayRequest, bearer: str, timeout_s: float | None,
                      client: str = "") -> AsyncIterator[gateway_pb2.GatewayChunk]:
        tracer = self.tracer
        with telemetry.child_span(tracer, "auth") as span:
            key = await self.authenticate(bearer, client)
            span.set_attribute("strata.key_id", key.key_id)
        with telemetry.child_span(tracer, "guardrails") as span:
            model, max_tokens = self._validate(req, key)
            req, flags = self._guard(req)
            flags += await self._screen_similar(req)
            span.set_attributes({"strata.model": model, "strata.flags": flags})
            for f in flags:
                self.metrics.guardrails.labels(f).inc()
        with telemetry.child_span(tracer, "limits") as span:
            await self._check_budget(key)
            prompt_tokens_est = _prompt_chars(req) // 4 + 1
            span.set_attribute("strata.reserved_tokens", prompt_tokens_est + max_tokens)
            reservation = await self._reserve(key, prompt_tokens_est + max_tokens)
        request_id = uuid.uuid4().hex
        used = [0, 0]                     # prompt and completion tokens actually consumed
        settled = False
        try:
            policy = req.cache_policy
            query = cache_pb2.CacheQuery(namespace=key.tenant, model=model, sampling=req.sampling)
            if req.HasField("messages"):
                query.messages.CopyFrom(req.messages)
            else:
                query.prompt = req.prompt
            if policy in (common_pb2.CACHE_POLICY_UNSPECIFIED, common_pb2.CACHE_POLICY_USE):
                with telemetry.child_span(tracer, "cache.lookup", kind=SpanKind.CLIENT) as span:
                    hit = await self.down.lookup(cache_pb2.LookupRequest(
                        query=query, policy=cache_pb2.LookupPolicy(allow_sampled=req.allow_sampled_cache)))
                    span.set_attribute("strata.cache.hit", bool(hit is not None and hit.hit))
                    if hit is not None and hit.hit:
                        span.set_attribute("strata.cache.layer", cache_pb2.CacheLayer.Name(hit.layer))
                if hit is not None and hit.hit:
                    async for chunk in self._replay(hit, request_id, model, flags):
                        yield chunk
                    await self._settle(key, reservation, 0, 0, model, cache_hit=True)
                    settled = True
                    return
            inference = inference_pb2.GenerateRequest(request_id=request_id, model=model, sampling=req.sampling,
                                                      priority=req.priority)
            inference.sampling.max_tokens = max_tokens
            if model in self.config.cascades and not inference.sampling.HasField("logprobs"):
                inference.sampling.logprobs = 0          # the chosen tokens' log-probabilities, for the cascade
            logprob_sum, logprob_n = 0.0, 0
            if req.HasField("messages"):
                inference.messages.CopyFrom(req.messages)
            else:
                inference.prompt = req.prompt
            text, token_ids, final = [], [], None
            route = telemetry.child_span(tracer, "router.generate", kind=SpanKind.CLIENT,
                                         attributes={"strata.model": model, "strata.request_id": request_id})
            with route as span:
                async for c in self.down.generate(inference, timeout_s):
                    used[0] = used[0] or len(c.prompt_token_ids)
                    used[1] += len(c.token_ids)
                    text.append(c.text)
                    token_ids.extend(c.token_ids)
                    logprob_sum += sum(lp.logprob for lp in c.logprobs)
                    logprob_n += len(c.logprobs)
                    last = c.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                    if last:
                        final = c
                        used[0] = c.usage.prompt_tokens
                    mean = logprob_sum / logprob_n if last and logprob_n else None
                    if not self.config.redact_responses:
                        yield self._chunk(request_id, c.text, c.token_ids, c if last else None, flags, mean)
                if final is not None:
                    span.set_attribute("strata.replica", final.source.replica)
            if final is None:
                raise UnavailableError("the answer ended without its final chunk")
            answer = "".join(text)
            if self.config.redact_responses:
                red = redact(answer)
                yield self._chunk(request_id, red.text, token_ids, final, flags + [f"pii_out:{k}" for k in red.found],
                                  logprob_sum / logprob_n if logprob_n else None)
            await self._settle(key, reservation, final.usage.prompt_tokens, final.usage.completion_tokens, model)
            settled = True
            self.metrics.tokens.labels("prompt").inc(final.usage.prompt_tokens)
            self.metrics.tokens.labels("completion").inc(final.usage.completion_tokens)
            if policy != common_pb2.CACHE_POLICY_BYPASS and final.finish_reason in (
                    common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH):
                with telemetry.child_span(tracer, "cache.store", kind=SpanKind.CLIENT) as span:
                    stored = await self.down.store(cache_pb2.StoreRequest(
                        query=query, allow_sampled=req.allow_sampled_cache,
                        answer=cache_pb2.CachedAnswer(text=answer, token_ids=token_ids, usage=final.usage,
                                                      finish_reason=final.finish_reason)))
                    span.set_attribute("strata.cache.stored", stored)
        finally:
            if not settled:               # failed or cut short: charge what was used, free the slot
                await self._settle(key, reservation, used[0], used[1], model, count=False)

    async def generate(self, req: gateway_pb2.GatewayRequest, bearer: str, timeout_s: float | None = None,
                       client: str = "") -> gateway_pb2.GatewayResponse:
        """Unary: the whole answer. A configured cascade re-asks its larger model once when the model's
        answer has a mean token log-probability under the threshold (cached answers are never re-asked)."""
        out = await self._collect(self.stream(req, bearer, timeout_s, client))
        cascade = self.config.cascades.get(out.source.model)
        if (cascade is not None and out.source.kind == common_pb2.Source.KIND_MODEL and out.HasField("mean_logprob")
                and out.mean_logprob < cascade.min_mean_logprob):
            again = gateway_pb2.GatewayRequest()
            again.CopyFrom(req)
            again.model = cascade.to
            first_model = out.source.model
            out = await self._collect(self.stream(again, bearer, timeout_s, client))
            out.flags.append(f"cascade:{first_model}->{cascade.to}")
        return out

    @staticmethod
    async def _collect(chunks: AsyncIterator[gateway_pb2.GatewayChunk]) -> gateway_pb2.GatewayResponse:
        out = gateway_pb2.GatewayResponse()
        text = []
        async for c in chunks:
            out.request_id = c.request_id
            text.append(c.text)
            out.token_ids.extend(c.token_ids)
            if c.finish_reason:
                out.finish_reason = c.finish_reason
                out.usage.CopyFrom(c.usage)
                out.source.CopyFrom(c.source)
                out.flags.extend(c.flags)
                if c.HasField("mean_logprob"):
                    out.mean_logprob = c.mean_logprob
        out.text = "".join(text)
        return out

    # ---- steps
    def _validate(self, req: gateway_pb2.GatewayRequest, key: ApiKey) -> tuple[str, int]:
        model = req.model or next(iter(self.config.models))
        if model == "auto":
            text = "\n".join(m.content for m in req.messages.messages) if req.HasField("messages") else req.prompt
            model = select_model(self.config.auto_rules, self.config.auto_default or next(iter(self.config.models)),
                                 text, key.tier)
        if model not in self.config.models:
            raise InvalidArgumentError(f"unknown model {model!r}; ListModels lists the served models")
        if not key.allows(model):
            raise PermissionDeniedError(f"this API key may not use model {model!r}")
        if not (req.prompt or (req.HasField("messages") and req.messages.messages)):
            raise InvalidArgumentError("a prompt or at least one message is required")
        if _prompt_chars(req) > self.config.max_prompt_chars:
            raise InvalidArgumentError(f"the prompt is longer than {self.config.max_prompt_chars} characters")
        if req.HasField("messages"):
            for m in req.messages.messages:
                if m.role not in ("system", "user", "assistant"):
                    raise InvalidArgumentError(f"message role must be system, user or assistant, not {m.role!r}")
        s = req.sampling
        max_tokens = s.max_tokens if s.HasField("max_tokens") else self.config.default_max_tokens
        if not 1 <= max_tokens <= self.config.max_tokens_limit:
            raise InvalidArgumentError(f"max_tokens must be in [1, {self.config.max_tokens_limit}]")
        return model, max_tokens

    def _guard(self, req: gateway_pb2.GatewayRequest) -> tuple[gateway_pb2.GatewayRequest, list[str]]:
        out = gateway_pb2.GatewayRequest()
        out.CopyFrom(req)
        flags: list[str] = []
        texts = [m for m in out.messages.messages] if out.HasField("messages") else None
        if self.config.pii_mode != "off":
            found: dict[str, int] = {}
            if texts is not None:
                for m in texts:
                    r = redact(m.content)
                    m.content = r.text
                    for k, n in r.found.items():
                        found[k] = found.get(k, 0) + n
            else:
                r = redact(out.prompt)
                out.prompt = r.text
                found = dict(r.found)
            if found and self.config.pii_mode == "block":
                raise InvalidArgumentError(f"the request contains personal data ({', '.join(sorted(found))}); "
                                           "this gateway refuses it instead of redacting")
            flags += [f"pii:{k}" for k in sorted(found)]
        if self.config.injection_mode != "allow":
            content = "\n".join(m.content for m in texts if m.role == "user") if texts is not None else out.prompt
            screen = screen_injection(content)
            if screen.flagged and self.config.injection_mode == "block":
                raise PermissionDeniedError(f"the request looks like a prompt injection ({', '.join(screen.rules)})")
            flags += [f"injection:{r}" for r in screen.rules]
        return out, flags

    async def _screen_similar(self, req: gateway_pb2.GatewayRequest) -> list[str]:
        if self.similarity is None or self.config.injection_mode == "allow":
            return []
        content = ("\n".join(m.content for m in req.messages.messages if m.role == "user")
                   if req.HasField("messages") else req.prompt)
        score = await self.similarity.score(content)
        if score < self.similarity.threshold:
            return []
        if self.config.injection_mode == "block":
            raise PermissionDeniedError(f"the request looks like a prompt injection (similar to a known attack, {score:.2f})")
        return ["injection:similar"]

    async def _check_budget(self, key: ApiKey) -> None:
        if key.budget_usd <= 0:
            return
        try:
            spent = await self.usage.total_spend(key.key_id)
        except _REDIS_ERRORS:
            if self.config.limits_fail_open:
                return
            raise UnavailableError("cannot check the budget right now (store unreachable)") from None
        if spent >= key.budget_usd:
            raise ResourceExhaustedError(f"the key's budget of ${key.budget_usd:.2f} is spent (${spent:.4f})")

    async def _reserve(self, key: ApiKey, tokens: int) -> Reservation | None:
        if key.limits == Limits():
            return None
        try:
            return await self.limiter.reserve(key.key_id, key.limits, tokens)
        except _REDIS_ERRORS:
            if self.config.limits_fail_open:
                log.warning("limit store unreachable: admitting without limits (fail-open)")
                return None
            raise UnavailableError("cannot check rate limits right now (limit store unreachable)") from None

    async def _settle(self, key: ApiKey, r: Reservation | None, prompt_tokens: int, completion_tokens: int,
                      model: str, cache_hit: bool = False, count: bool = True) -> None:
        if count or prompt_tokens or completion_tokens:   # in memory, written in batches: Redis may be away
            cost = self.config.models[model].cost(prompt_tokens, completion_tokens)
            await self.usage.record(key.key_id, prompt_tokens, completion_tokens, cost, cache_hit, answered=count)
        if r is not None:
            try:
                await self.limiter.reconcile(r, prompt_tokens + completion_tokens)
            except _REDIS_ERRORS:                  # retried in the background: the concurrency slot comes back
                log.warning("limits could not be reconciled (store unreachable); retrying")
                task = asyncio.create_task(self._reconcile_later(r, prompt_tokens + completion_tokens))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _reconcile_later(self, r: Reservation, tokens: int) -> None:
        for i in range(RECONCILE_ATTEMPTS):        # 1, 2, 4, ... 32 s: past a Redis restart (reconcile is idempotent)
            await asyncio.sleep(2 ** i)
            try:
                await self.limiter.reconcile(r, tokens)
                return
            except _REDIS_ERRORS:
                pass
        log.warning("limits could not be reconciled; the reservation's lease expires on its own")

    async def close(self) -> None:
        await cancel_and_wait(self._background)

    async def _replay(self, hit: cache_pb2.LookupResponse, request_id: str, model: str,
                      flags: list[str]) -> AsyncIterator[gateway_pb2.GatewayChunk]:
        words, n = re.findall(r"\s*\S+\s*", hit.answer.text) or [hit.answer.text], self.config.replay_chunk_words
        pieces = ["".join(words[i:i + n]) for i in range(0, len(words), n)]
        kind = (common_pb2.Source.KIND_CACHE_EXACT if hit.layer == cache_pb2.CACHE_LAYER_EXACT
                else common_pb2.Source.KIND_CACHE_SEMANTIC)
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            chunk = gateway_pb2.GatewayChunk(request_id=request_id, text=piece)
            if last:
                chunk.token_ids.extend(hit.answer.token_ids)
                chunk.finish_reason = hit.answer.finish_reason or common_pb2.FINISH_REASON_STOP
                chunk.usage.CopyFrom(common_pb2.Usage())          # no model tokens were spent
                chunk.source.CopyFrom(common_pb2.Source(kind=kind, model=model, entry_id=hit.entry_id))
                chunk.flags.extend(flags)
            yield chunk

    @staticmethod
    def _chunk(request_id: str, text: str, token_ids, final: inference_pb2.GenerateChunk | None,
               flags: list[str], mean_logprob: float | None = None) -> gateway_pb2.GatewayChunk:
        c = gateway_pb2.GatewayChunk(request_id=request_id, text=text, token_ids=token_ids)
        if mean_logprob is not None:
            c.mean_logprob = mean_logprob
        if final is not None:
            c.finish_reason = final.finish_reason
            c.usage.CopyFrom(final.usage)
            c.source.CopyFrom(final.source)
            c.flags.extend(flags)
        return c

    # ---- admin
    async def create_key(self, tenant: str, models: list[str], limits: Limits, budget_usd: float,
                         tier: str = "") -> tuple[str, ApiKey]:
        unknown = [m for m in models if m not in self.config.models]
        if unknown:
            raise InvalidArgumentError(f"unknown models: {', '.join(unknown)}")
        with _store_unavailable("create a key"):
            return await self.keys.create(tenant, tuple(models), limits, budget_usd, tier)

    async def get_usage(self, key_id: str, day: str) -> tuple[str, object, float]:
        day = day or utc_day()
        if not is_utc_day(day):
            raise InvalidArgumentError("day must be a date written YYYY-MM-DD")
        with _store_unavailable("read usage"):
            await self.keys.require(key_id)
            return day, await self.usage.day(key_id, day), await self.usage.total_spend(key_id)


@contextlib.contextmanager
def _store_unavailable(what: str) -> Iterator[None]:
    """Redis unreachable during an admin call: UNAVAILABLE with a message, not gRPC's UNKNOWN."""
    try:
        yield
    except _REDIS_ERRORS:
        raise UnavailableError(f"cannot {what} right now (key store unreachable)") from None


def _prompt_chars(req: gateway_pb2.GatewayRequest) -> int:
    if req.HasField("messages"):
        return sum(len(m.content) for m in req.messages.messages)
    return len(req.prompt)
