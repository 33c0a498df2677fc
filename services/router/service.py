"""The router's logic: choose a replica, stream its answer, retry elsewhere only while nothing has
reached the caller, keep per-replica circuit breakers honest.

Retried (before the first chunk only, on another replica, with exponential backoff and jitter):
UNAVAILABLE, RESOURCE_EXHAUSTED (that replica's queue is full), CANCELLED by the replica (it is
shutting down). A failure after the first chunk ends the stream with UNAVAILABLE: a second replica
would start the answer over and the caller would see it twice. Errors that are the request's own
(INVALID_ARGUMENT, …) pass through unchanged and do not count against the replica.

A full queue is load, not a fault: it does not count against the replica's circuit, and when every
replica tried (fallback models included) was full the caller gets RESOURCE_EXHAUSTED with retry-after,
at once, rather than UNAVAILABLE or a wait in an ever longer queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import AsyncIterator, Mapping, Sequence

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common import telemetry
from services.common.aio import cancel_and_wait
from services.common.errors import (DeadlineExceededError, InvalidArgumentError, NotFoundError,
                                    ResourceExhaustedError, StrataError, UnavailableError, UpstreamError)
from services.common.metrics import RouterMetrics
from services.common.pb import inference_pb2
from services.router.backends import Backend, BackendConfig
from services.router.policy import Candidate, Picker, split_pick

log = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})
REPLICA_FAULTS = RETRYABLE | {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
CHARS_PER_TOKEN = 4          # the router does not tokenize: a prompt's token estimate for load accounting
FULL_RETRY_AFTER_S = 1.0     # retry-after when every replica's queue was full


class _ModelUnavailable(UnavailableError):
    """None of one model's replicas could start the answer. `reason`: "full" (every one tried was at
    capacity), "unserved" (every replica is known to serve another model) or "down"."""

    def __init__(self, message: str, reason: str = "down") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RouterConfig:
    backends: Sequence[str] = ()
    policy: str = "least_pending"
    max_attempts: int = 3                 # replicas tried per request, before its first chunk
    backoff_base_s: float = 0.05
    backoff_max_s: float = 1.0
    default_max_tokens: int = 512         # load estimate when a request leaves max_tokens unset
    # a requested name -> {served model: weight}: A/B splits ("chat" -> 90% v1, 10% v2)
    splits: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # a model -> models to try, in order, when none of its replicas could start the answer
    fallbacks: Mapping[str, Sequence[str]] = field(default_factory=dict)
    backend: BackendConfig = field(default_factory=BackendConfig)
    discover_url: str = ""                # Redis where replicas register (services/common/registry.py)
    discover_interval_s: float = 1.0


def prompt_text(req: inference_pb2.GenerateRequest) -> str:
    if req.HasField("messages"):
        return "\n".join(f"{m.role}: {m.content}" for m in req.messages.messages)
    return req.prompt


def affinity_key(req: inference_pb2.GenerateRequest) -> str:
    """What prefix affinity hashes: the start of the first message (a shared system prompt, or a
    conversation's opening turn, stays on the replica whose prefix cache holds it), else of the prompt."""
    if req.HasField("messages") and req.messages.messages:
        first = req.messages.messages[0]
        return f"{first.role}\n{first.content}"
    if req.prompt_token_ids:
        return ",".join(map(str, req.prompt_token_ids[:64]))
    return req.prompt


def estimated_tokens(req: inference_pb2.GenerateRequest, default_max_tokens: int) -> int:
    prompt = len(req.prompt_token_ids) or len(prompt_text(req)) // CHARS_PER_TOKEN + 1
    max_tokens = req.sampling.max_tokens if req.sampling.HasField("max_tokens") else default_max_tokens
    samples = req.sampling.n if req.sampling.HasField("n") else 1    # n samples: the prompt once, each its answer
    return prompt + max(0, max_tokens) * max(1, samples)


class Router:
    def __init__(self, config: RouterConfig, tracer: trace.Tracer | None = None,
                 metrics: RouterMetrics | None = None) -> None:
        if not config.backends and not config.discover_url:
            raise ValueError("the router needs inference backends (--backend host:port) or --discover REDIS_URL")
        if config.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        for name, weights in config.splits.items():
            if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise ValueError(f"split {name!r} needs non-negative weights with a positive sum")
        self.config = config
        self.tracer = tracer or telemetry.tracer("router")
        self.metrics = metrics or RouterMetrics()
        self.picker = Picker(config.policy)
        self.backends = {a: Backend(a, config.backend) for a in dict.fromkeys(config.backends)}
        self._discovery: asyncio.Task | None = None
        self._retiring: list[asyncio.Task] = []

    async def start(self) -> None:
        for b in self.backends.values():
            b.start()
        if self.config.discover_url:
            self._discovery = asyncio.create_task(self._discover(), name="router-discovery")

    async def close(self) -> None:
        if self._discovery is not None:
            await cancel_and_wait([self._discovery])
        await cancel_and_wait(self._retiring)
        await asyncio.gather(*(b.close() for b in self.backends.values()))

    async def _discover(self) -> None:
        """Add replicas that registered in Redis, retire those whose heartbeat lapsed (static ones stay)."""
        from redis.exceptions import RedisError

        from services.common import redis_client

        from services.common.registry import Registry

        client = redis_client.connect(self.config.discover_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        registry, static = Registry(client), set(self.config.backends)
        try:
            while True:
                try:
                    alive = set(await registry.alive())
                except (RedisError, OSError):
                    alive = None                 # keep what we have while Redis is away
                if alive is not None:
                    for address in sorted(alive - set(self.backends)):
                        b = self.backends[address] = Backend(address, self.config.backend)
                        b.start()
                        log.info("replica discovered", extra={"backend": address})
                    for address in sorted(set(self.backends) - alive - static):
                        b = self.backends.pop(address)
                        log.info("replica deregistered", extra={"backend": address})
                        self._retiring = [t for t in self._retiring if not t.done()]
                        self._retiring.append(asyncio.create_task(self._retire(b)))
                await asyncio.sleep(self.config.discover_interval_s)
        finally:
            await client.aclose()

    async def _retire(self, b: Backend, drain_s: float = 30.0) -> None:
        """Close a replica's channel once its in-flight requests are done (or after drain_s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        while b.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.1)
        await b.close()

    def resolve(self, name: str, chat: bool = False) -> str:
        """The served model for a requested name: a weighted draw when the name is a split (for a chat
        request, among the split's models that serve chat, when any does)."""
        weights = self.config.splits.get(name)
        if not weights:
            return name
        if chat:
            able = {m: w for m, w in weights.items() if self.serves_chat(m) is not False and w > 0}
            weights = able or weights
        return split_pick(weights)

    def serves_chat(self, model: str) -> bool | None:
        """Whether `model`'s replicas serve chat messages: None while none of them has said (GetModelInfo)."""
        known = [b.chat for b in self.backends.values() if b.model == model]
        return any(known) if known else None

    def choose(self, req: inference_pb2.GenerateRequest, exclude: set[str]) -> Backend | None:
        chat = req.HasField("messages")        # a chat request never goes to a replica known to serve completions only
        up = [b for b in self.backends.values() if b.healthy and b.address not in exclude and b.circuit.state != "open"
              and (not req.model or b.model == req.model) and (not chat or b.chat or b.model is None)]
        prefix = affinity_key(req) if self.picker.policy == "prefix_affinity" else ""
        while up:
            c = self.picker.pick([Candidate(b.address, b.pending_tokens, b.in_flight) for b in up], prefix)
            b = self.backends[c.address]
            if b.circuit.allow():
                return b
            up.remove(b)                      # half-open with its probe already out
        return None

    async def generate(self, req: inference_pb2.GenerateRequest,
                       timeout_s: float | None = None) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """Try the requested model's replicas, then its fallbacks in order, each model at most once (a
        cyclic fallback configuration ends instead of looping)."""
        code = "OK"
        try:
            async with contextlib.aclosing(self._generate(req, timeout_s)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except StrataError as exc:
            code = exc.status
            raise
        except BaseException:
            code = "CANCELLED"
            raise
        finally:
            self.metrics.requests.labels(code).inc()

    async def _generate(self, req: inference_pb2.GenerateRequest,
                        timeout_s: float | None) -> AsyncIterator[inference_pb2.GenerateChunk]:
        if not (req.prompt or req.HasField("messages") or req.prompt_token_ids):
            raise InvalidArgumentError("one of prompt, messages or prompt_token_ids is required")
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        chat = req.HasField("messages")
        queue, visited, errors, reasons = [self.resolve(req.model, chat)], [], [], set()
        while queue:
            model = queue.pop(0)
            if model in visited:
                continue
            visited.append(model)
            if chat and model and self.serves_chat(model) is False:
                if len(visited) == 1:
                    raise InvalidArgumentError(f"model {model!r} has no chat template: it serves completions only "
                                               "(send a prompt, not messages)")
                errors.append(f"{model}: serves completions only")    # a fallback unable to take chat: skipped
                queue += [self.resolve(m, chat) for m in self.config.fallbacks.get(model, ())]
                continue
            if len(visited) > 1:
                self.metrics.fallbacks.inc()
            attempt = inference_pb2.GenerateRequest()
            attempt.CopyFrom(req)
            attempt.model = model
            started = False
            try:
                async with contextlib.aclosing(self._generate_on(attempt, deadline)) as chunks:
                    async for chunk in chunks:   # closed with us: a caller that leaves frees the replica at once
                        started = True
                        yield chunk
                return
            except UnavailableError as exc:
                if started:
                    raise
                errors.append(f"{model or 'any model'}: {exc}")
                reasons.add(exc.reason if isinstance(exc, _ModelUnavailable) else "down")
            queue += [self.resolve(m, chat) for m in self.config.fallbacks.get(model, ())]
        message = "; ".join(errors) + (f" (models tried: {', '.join(visited)})" if len(visited) > 1 else "")
        if reasons == {"full"}:
            raise ResourceExhaustedError(f"every replica is at capacity: {message}", retry_after_s=FULL_RETRY_AFTER_S)
        if reasons == {"unserved"}:
            raise NotFoundError(message)
        raise UnavailableError(message)

    async def _generate_on(self, req: inference_pb2.GenerateRequest,
                           deadline: float | None) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """One model: its replicas, up to max_attempts, retrying only before the first chunk."""
        loop = asyncio.get_running_loop()
        tokens = estimated_tokens(req, self.config.default_max_tokens)
        tried: set[str] = set()
        full = 0                                  # attempts a replica refused with a full queue
        last_error = "no healthy inference replica" + (f" serves {req.model!r}" if req.model else "")
        for attempt in range(self.config.max_attempts):
            if attempt:
                await asyncio.sleep(self._backoff(attempt - 1, deadline))
            b = self.choose(req, tried)
            if b is None:
                break
            tried.add(b.address)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError("deadline exceeded before a replica answered")
            b.in_flight += 1
            b.routed += 1
            b.sent_tokens += tokens
            streamed = False
            if attempt:
                self.metrics.retries.inc()
            result = "ok"
            with telemetry.child_span(self.tracer, "route", kind=SpanKind.CLIENT, attributes={
                    "strata.replica": b.replica or b.address, "strata.attempt": attempt, "strata.model": req.model,
                    "strata.policy": self.picker.policy, "strata.replica_pending_tokens": b.pending_tokens}) as span:
                call = b.stub.Generate(req, timeout=remaining, metadata=telemetry.outgoing())
                try:
                    async for chunk in call:
                        streamed = True
                        yield chunk
                    b.circuit.record_success()
                    return
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    result = code.name
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        b.circuit.release()
                        raise DeadlineExceededError("deadline exceeded while generating") from None
                    if code not in REPLICA_FAULTS:    # the request's own fault: the replica is fine
                        b.circuit.record_success()
                        raise UpstreamError(code.name, exc.details() or code.name) from None
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not streamed:
                        full += 1                     # busy, not broken: no verdict for the circuit
                        last_error = f"replica {b.replica or b.address} is at capacity"
                        continue
                    b.failures += 1
                    b.circuit.record_failure()
                    last_error = f"replica {b.replica or b.address} failed: {code.name}"
                    log.warning("replica failed", extra={"backend": b.address, "code": code.name, "streamed": streamed})
                    if streamed:
                        raise UnavailableError(f"{last_error} after the answer had started; not retried "
                                               "(the caller would see the answer twice)") from None
                    if code not in RETRYABLE:
                        raise UpstreamError(code.name, exc.details() or code.name) from None
                except (asyncio.CancelledError, GeneratorExit):
                    result = "CANCELLED_BY_CALLER"
                    raise
                finally:
                    b.in_flight -= 1
                    b.circuit.release()
                    call.cancel()                 # the caller went away or we are done: free the replica's KV blocks
                    span.set_attribute("strata.result", result)
                    self.metrics.attempts.labels(b.replica or b.address, result).inc()
        served = {b.model for b in self.backends.values()}      # None: a replica whose model is not known yet
        if tried and full == len(tried):
            reason = "full"
        elif not tried and req.model and served and None not in served and req.model not in served:
            reason = "unserved"
            last_error = f"no replica serves model {req.model!r} (served: {', '.join(sorted(m for m in served if m))})"
        else:
            reason = "down"
        raise _ModelUnavailable(f"{last_error} (tried {len(tried)} of {len(self.backends)} replicas)", reason)

    def _backoff(self, attempt: int, deadline: float | None) -> float:
        delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** attempt) * random.uniform(0.5, 1.0)
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - asyncio.get_running_loop().time()))
        return delay
