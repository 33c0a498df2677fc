"""The gateway's downstream adapter: the router and the semantic cache over gRPC, in the pipeline's terms
(services.gateway.backends): the cache's and router's protobufs are translated to and from the gateway's
types here, router failures become domain errors with the router's status, and a cache that fails is a
miss (lookups) or a skipped store, never an error for the caller.

Cache lookups travel over one long-lived LookupStream (see `LookupPipe`) instead of a unary call each."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import AsyncIterator, Sequence

import grpc
import numpy as np

from services.common import telemetry
from services.common.errors import DeadlineExceededError, UnavailableError, UpstreamError
from services.common.pb import cache_pb2, cache_pb2_grpc, inference_pb2, router_pb2, router_pb2_grpc
from services.common.retry_after import retry_after_s
from services.common.tls import PLAINTEXT, TlsConfig
from services.gateway.backends import Answer, CacheHit, CacheQuery, Embedded, ModelChunk, ModelRequest
from services.gateway.errors import CapacityError
from services.gateway.translate import (finish_reason_from_pb, finish_reason_to_pb, logprobs_from_pb, sampling_to_pb,
                                        set_input, source_from_pb, tool_calls_from_pb, usage_from_pb, usage_to_pb)
from services.gateway.directory import ReplicaView
from services.gateway.types import Finish, SourceKind

log = logging.getLogger(__name__)
EMBED_TIMEOUT_S = 30.0        # an Embed call without a deadline of its own (2048 texts take seconds on a CPU)


class LookupPipe:
    """Cache lookups multiplexed over one LookupStream call: a writer task sends the queued requests, a
    reader task hands each answer to the lookup waiting on its id. If the stream breaks (the cache
    restarted, the connection dropped), the lookups in flight fail and the next one opens a new stream;
    a cache without LookupStream (UNIMPLEMENTED) is asked with unary Lookups from then on."""

    def __init__(self, stub: cache_pb2_grpc.SemanticCacheStub, timeout_s: float) -> None:
        self.stub, self.timeout_s = stub, timeout_s
        self.unary_only = False
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._outbox: asyncio.Queue[cache_pb2.LookupStreamRequest] | None = None
        self._tasks: list[asyncio.Task] = []

    async def lookup(self, req: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse:
        """The answer, or an exception (grpc.aio.AioRpcError, asyncio.TimeoutError)."""
        if self.unary_only:
            return await self.stub.Lookup(req, timeout=self.timeout_s, metadata=telemetry.outgoing())
        if self._outbox is None:
            self._open()
        assert self._outbox is not None
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        answer = self._waiting[request_id] = loop.create_future()
        timer = loop.call_later(self.timeout_s, _time_out, answer)     # cheaper than asyncio.wait_for
        try:
            self._outbox.put_nowait(cache_pb2.LookupStreamRequest(id=request_id, request=req,
                                                                  traceparent=telemetry.traceparent()))
            out: cache_pb2.LookupStreamResponse = await answer
        finally:
            timer.cancel()
            self._waiting.pop(request_id, None)
        if out.code:
            code = next((c for c in grpc.StatusCode if c.value[0] == out.code), grpc.StatusCode.UNKNOWN)
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), out.message)
        return out.response

    def _open(self) -> None:
        outbox: asyncio.Queue[cache_pb2.LookupStreamRequest] = asyncio.Queue()
        call = self.stub.LookupStream()
        self._outbox = outbox
        self._tasks = [asyncio.create_task(self._write(call, outbox), name="cache-lookup-writer"),
                       asyncio.create_task(self._read(call, outbox), name="cache-lookup-reader")]

    async def _write(self, call, outbox: asyncio.Queue) -> None:
        try:
            while True:
                await call.write(await outbox.get())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass                           # the call failed: the reader sees it too and cleans up
        finally:
            call.cancel()                  # whatever stopped the writer ends the stream, so the reader cleans up

    async def _read(self, call, outbox: asyncio.Queue) -> None:
        error: BaseException = ConnectionError("the cache lookup stream ended")
        try:
            async for out in call:
                waiting = self._waiting.get(out.id)
                if waiting is not None and not waiting.done():
                    waiting.set_result(out)
        except grpc.aio.AioRpcError as exc:
            error = exc
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.warning("the cache has no LookupStream: using unary Lookup calls")
                self.unary_only = True
        finally:
            if self._outbox is outbox:     # the next lookup opens a new stream
                self._outbox = None
            call.cancel()
            for waiting in list(self._waiting.values()):
                if not waiting.done():
                    waiting.set_exception(error)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _time_out(answer: asyncio.Future) -> None:
    if not answer.done():
        answer.set_exception(asyncio.TimeoutError())


def query_to_pb(q: CacheQuery) -> cache_pb2.CacheQuery:
    out = cache_pb2.CacheQuery(namespace=q.namespace, model=q.model, sampling=sampling_to_pb(q.sampling))
    set_input(out, q.prompt, q.messages)
    return out


def model_request_to_pb(r: ModelRequest) -> inference_pb2.GenerateRequest:
    out = inference_pb2.GenerateRequest(request_id=r.request_id, model=r.model, sampling=sampling_to_pb(r.sampling),
                                        priority=r.priority)
    set_input(out, r.prompt, r.messages, r.tools)
    return out


def hit_from_pb(out: cache_pb2.LookupResponse) -> CacheHit:
    a = out.answer
    kind = SourceKind.CACHE_EXACT if out.layer == cache_pb2.CACHE_LAYER_EXACT else SourceKind.CACHE_SEMANTIC
    return CacheHit(kind, out.entry_id, a.text, tuple(a.token_ids), finish_reason_from_pb(a.finish_reason))


def model_chunk_from_pb(c: inference_pb2.GenerateChunk) -> ModelChunk:
    finish = None
    if c.finish_reason:                   # the last chunk
        finish = Finish(finish_reason_from_pb(c.finish_reason), usage_from_pb(c.usage), source_from_pb(c.source))
    return ModelChunk(c.text, tuple(c.token_ids), len(c.prompt_token_ids),
                      logprobs_from_pb(c.logprobs) if c.logprobs else (), finish,
                      tuple(tool_calls_from_pb(c.tool_calls)) if c.tool_calls else (), c.index)


class Downstream:
    """services.gateway.backends.Backends over gRPC. `lookup` is the raw cache lookup (protobuf in and out,
    a failure is None) that `find` translates around."""

    def __init__(self, router_address: str, cache_address: str = "", cache_timeout_s: float = 0.5,
                 tls: TlsConfig = PLAINTEXT) -> None:
        self._router_ch = tls.channel(router_address)
        self.router = router_pb2_grpc.RouterStub(self._router_ch)
        self._cache_ch = tls.channel(cache_address) if cache_address else None
        self.cache = cache_pb2_grpc.SemanticCacheStub(self._cache_ch) if self._cache_ch else None
        self.cache_timeout_s = cache_timeout_s
        self._lookups = LookupPipe(self.cache, cache_timeout_s) if self.cache else None

    async def close(self) -> None:
        if self._lookups is not None:
            await self._lookups.close()
        await self._router_ch.close()
        if self._cache_ch is not None:
            await self._cache_ch.close()

    async def lookup(self, req: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse | None:
        if self._lookups is None:
            return None
        try:
            return await self._lookups.lookup(req)
        except grpc.aio.AioRpcError as exc:
            log.warning("cache lookup failed: bypassing the cache", extra={"code": exc.code().name})
        except asyncio.TimeoutError:
            log.warning("cache lookup timed out: bypassing the cache", extra={"timeout_s": self.cache_timeout_s})
        except ConnectionError:
            log.warning("cache lookup stream ended: bypassing the cache")
        return None

    async def find(self, query: CacheQuery, allow_sampled: bool) -> CacheHit | None:
        if self._lookups is None:
            return None
        out = await self.lookup(cache_pb2.LookupRequest(
            query=query_to_pb(query), policy=cache_pb2.LookupPolicy(allow_sampled=allow_sampled)))
        return hit_from_pb(out) if out is not None and out.hit else None

    async def store(self, query: CacheQuery, answer: Answer, allow_sampled: bool) -> bool:
        if self.cache is None:
            return False
        req = cache_pb2.StoreRequest(query=query_to_pb(query), allow_sampled=allow_sampled, answer=cache_pb2.CachedAnswer(
            text=answer.text, token_ids=answer.token_ids, usage=usage_to_pb(answer.usage),
            finish_reason=finish_reason_to_pb(answer.finish_reason)))
        try:
            return (await self.cache.Store(req, timeout=self.cache_timeout_s * 4, metadata=telemetry.outgoing())).stored
        except grpc.aio.AioRpcError as exc:
            log.warning("cache store failed", extra={"code": exc.code().name})
            return False

    async def embed(self, texts: Sequence[str], truncate: bool, timeout_s: float | None) -> Embedded:
        if self.cache is None:
            raise UnavailableError("embeddings are served by the semantic cache's model, and no cache is configured")
        try:
            out = await self.cache.Embed(cache_pb2.EmbedTextsRequest(texts=texts, truncate=truncate),
                                         timeout=timeout_s or EMBED_TIMEOUT_S, metadata=telemetry.outgoing())
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceededError("deadline exceeded while embedding") from None
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise UpstreamError(exc.code().name, exc.details() or exc.code().name) from None
            raise UnavailableError(f"the embedding model (in the semantic cache) is unavailable: {exc.code().name}") from None
        vectors = np.frombuffer(out.vectors, "<f4").reshape(len(texts), out.dim)
        return Embedded(out.model, vectors, tuple(out.tokens))

    async def replicas(self) -> list[ReplicaView]:
        """The router's replicas (ListBackends), for the gateway's model directory."""
        out = await self.router.ListBackends(router_pb2.ListBackendsRequest(), timeout=1.0)
        return [ReplicaView(b.model, b.healthy, b.chat, b.load.pending_tokens, b.load.num_waiting, b.load.num_running,
                            b.in_flight)
                for b in out.backends]

    async def generate(self, request: ModelRequest, timeout_s: float | None) -> AsyncIterator[ModelChunk]:
        call = self.router.Generate(model_request_to_pb(request), timeout=timeout_s, metadata=telemetry.outgoing())
        try:
            async for chunk in call:
                yield model_chunk_from_pb(chunk)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceededError("deadline exceeded while generating") from None
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:     # every replica is full: keep retry-after
                raise CapacityError(exc.details() or "the inference replicas are at capacity",
                                    retry_after_s(exc)) from None
            raise UpstreamError(exc.code().name, exc.details() or exc.code().name) from None
        finally:
            call.cancel()
