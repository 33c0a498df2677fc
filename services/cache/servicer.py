"""gRPC adapter for the semantic cache: protobuf in, SemanticCacheService calls, protobuf out."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf import wrappers_pb2
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.cache.keys import ANSWER_FIELDS
from services.cache.service import LookupResult, Query, SemanticCacheService
from services.common import telemetry
from services.common.aio import cancel_and_wait
from services.common.errors import InvalidArgumentError, StrataError
from services.common.grpc_errors import Undecodable, bounded_details, map_errors
from services.common.metrics import CacheMetrics
from services.common.pb import cache_pb2, cache_pb2_grpc, common_pb2
from services.embedding import MODEL_NAME as EMBEDDING_MODEL

_REPEATED_OR_PLAIN = ("stop", "stop_token_ids", "ignore_eos", "response_format")
_SAMPLING_OPTIONAL = tuple(k for k in ANSWER_FIELDS if k not in _REPEATED_OR_PLAIN)   # proto3 `optional` fields
log = logging.getLogger(__name__)
_LAYER = {"exact": cache_pb2.CACHE_LAYER_EXACT, "semantic": cache_pb2.CACHE_LAYER_SEMANTIC}


def query_from_proto(q: cache_pb2.CacheQuery) -> Query:
    sampling = {name: getattr(q.sampling, name) for name in _SAMPLING_OPTIONAL if q.sampling.HasField(name)}
    sampling["stop"] = list(q.sampling.stop)
    sampling["stop_token_ids"] = list(q.sampling.stop_token_ids)
    sampling["ignore_eos"] = q.sampling.ignore_eos
    f = q.sampling.response_format
    if f.type:                                  # TYPE_TEXT (0) is free text, as unset
        sampling["response_format"] = {"type": f.type, "spec": f.spec, "strict": f.strict}
    kind = q.WhichOneof("input")
    if kind == "prompt":
        return Query(q.namespace, q.model, prompt=q.prompt, sampling=sampling)
    if kind == "messages":
        if not q.messages.messages:
            raise InvalidArgumentError("messages is empty")
        return Query(q.namespace, q.model, messages=[(m.role, m.content) for m in q.messages.messages],
                     sampling=sampling)
    raise InvalidArgumentError("query needs a prompt or messages")


def undecodable_answer(item: Undecodable) -> cache_pb2.LookupStreamResponse:
    """INVALID_ARGUMENT for a stream item that does not parse, under its id when that much is readable
    (as a UInt64Value the item is field 1, its id; the other fields are unknown to it and skipped), else 0."""
    try:
        item_id = wrappers_pb2.UInt64Value.FromString(item.data).value
    except DecodeError:
        item_id = 0
    return cache_pb2.LookupStreamResponse(id=item_id, code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                          message=bounded_details(item.reason))


def lookup_to_proto(r: LookupResult) -> cache_pb2.LookupResponse:
    resp = cache_pb2.LookupResponse(hit=r.hit, layer=_LAYER.get(r.layer, cache_pb2.CACHE_LAYER_UNSPECIFIED),
                                    score=r.score, confidence=r.confidence, degraded=r.degraded,
                                    miss_reason=r.miss_reason)
    if r.hit and r.entry is not None:
        e = r.entry
        resp.entry_id = e.entry_id
        resp.answer.CopyFrom(cache_pb2.CachedAnswer(
            text=e.response, token_ids=e.token_ids, finish_reason=e.finish_reason,
            usage=common_pb2.Usage(prompt_tokens=e.prompt_tokens, completion_tokens=e.completion_tokens,
                                   cached_prompt_tokens=e.cached_prompt_tokens)))
    return resp


class SemanticCacheServicer(cache_pb2_grpc.SemanticCacheServicer):
    SERVICE = "strata.v1.SemanticCache"

    def __init__(self, service: SemanticCacheService, tracer: trace.Tracer | None = None,
                 metrics: CacheMetrics | None = None) -> None:
        self.service = service
        self.tracer = tracer or telemetry.tracer("cache")
        self.metrics = metrics or CacheMetrics()

    async def _lookup(self, request: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse:
        t0 = time.perf_counter()
        p = request.policy
        result = await self.service.lookup(
            query_from_proto(request.query),
            semantic=p.semantic if p.HasField("semantic") else True,
            min_similarity=p.min_similarity if p.HasField("min_similarity") else None,
            allow_sampled=p.allow_sampled if p.HasField("allow_sampled") else False)
        self.metrics.lookup_latency.observe(time.perf_counter() - t0)
        span = trace.get_current_span()
        span.set_attributes({"strata.cache.hit": result.hit, "strata.cache.layer": result.layer,
                             "strata.cache.miss_reason": result.miss_reason})
        return lookup_to_proto(result)

    @map_errors
    async def Lookup(self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext) -> cache_pb2.LookupResponse:
        return await self._lookup(request)

    async def LookupStream(self, requests, context: grpc.aio.ServicerContext):
        """Each request is looked up as its own task; answers are written by this one generator (a
        gRPC stream takes one write at a time) in the order they complete. An item that does not parse
        is answered INVALID_ARGUMENT at once (undecodable_answer); the stream carries on."""
        answers: asyncio.Queue[cache_pb2.LookupStreamResponse | None] = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def one(item: cache_pb2.LookupStreamRequest) -> None:
            out = cache_pb2.LookupStreamResponse(id=item.id)
            with self.tracer.start_as_current_span(
                    "strata.v1.SemanticCache/Lookup", context=telemetry.context_from_traceparent(item.traceparent),
                    kind=SpanKind.SERVER, attributes={"rpc.system": "grpc", "strata.stream_id": item.id},
                    record_exception=False, set_status_on_exception=False) as span:
                try:
                    out.response.CopyFrom(await self._lookup(item.request))
                except StrataError as exc:
                    out.code, out.message = grpc.StatusCode[exc.status].value[0], bounded_details(str(exc))
                except Exception as exc:  # noqa: BLE001 - one failed lookup must not end the others' stream
                    log.error("internal error in a streamed lookup", exc_info=exc)
                    out.code, out.message = grpc.StatusCode.INTERNAL.value[0], f"internal error ({type(exc).__name__})"
                if out.code:
                    span.set_status(Status(StatusCode.ERROR, next(c.name for c in grpc.StatusCode if c.value[0] == out.code)))
                span.set_attribute("rpc.grpc.status_code", out.code)
            answers.put_nowait(out)

        async def read() -> None:
            try:
                async for item in requests:
                    if item.__class__ is Undecodable:
                        answers.put_nowait(undecodable_answer(item))
                        continue
                    task = asyncio.create_task(one(item))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:                       # the caller is done writing: finish what it asked
                    await asyncio.wait(set(running))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader                             # re-raises a failed read (the caller went away)
        finally:
            await cancel_and_wait([reader, *running])

    @map_errors
    async def Store(self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext) -> cache_pb2.StoreResponse:
        a = request.answer
        entry_id, reason = await self.service.store_answer(
            query_from_proto(request.query), a.text, token_ids=list(a.token_ids),
            prompt_tokens=a.usage.prompt_tokens, completion_tokens=a.usage.completion_tokens,
            cached_prompt_tokens=a.usage.cached_prompt_tokens, finish_reason=a.finish_reason,
            ttl_s=request.ttl_s if request.HasField("ttl_s") else None, allow_sampled=request.allow_sampled)
        return cache_pb2.StoreResponse(stored=entry_id is not None, entry_id=entry_id or "", reason=reason)

    @map_errors
    async def Delete(self, request: cache_pb2.DeleteRequest, context: grpc.aio.ServicerContext) -> cache_pb2.DeleteResponse:
        return cache_pb2.DeleteResponse(deleted=await self.service.delete(request.namespace, request.entry_id))

    @map_errors
    async def Invalidate(self, request: cache_pb2.InvalidateRequest,
                         context: grpc.aio.ServicerContext) -> cache_pb2.InvalidateResponse:
        return cache_pb2.InvalidateResponse(deleted=await self.service.invalidate(request.namespace, request.model))

    @map_errors
    async def Embed(self, request: cache_pb2.EmbedTextsRequest,
                    context: grpc.aio.ServicerContext) -> cache_pb2.EmbedTextsResponse:
        vectors, tokens = await self.service.embed(list(request.texts), request.truncate)
        return cache_pb2.EmbedTextsResponse(model=EMBEDDING_MODEL, dim=vectors.shape[1],
                                            vectors=vectors.astype("<f4", copy=False).tobytes(), tokens=tokens)

    @map_errors
    async def Stats(self, request: cache_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> cache_pb2.CacheStats:
        return cache_pb2.CacheStats(**await self.service.stats(request.namespace))
