"""The gateway's downstream calls (router, semantic cache) over gRPC, translated into domain terms so
the gateway's logic never sees grpc: router failures become domain errors with the router's status, a
cache that fails is a miss (lookups) or a skipped store, never an error for the caller."""

from __future__ import annotations

import logging
from typing import AsyncIterator

import grpc

from services.common.errors import DeadlineExceededError, UpstreamError
from services.common.pb import cache_pb2, cache_pb2_grpc, inference_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


class Downstream:
    def __init__(self, router_address: str, cache_address: str = "", cache_timeout_s: float = 0.5) -> None:
        self._router_ch = grpc.aio.insecure_channel(router_address)
        self.router = router_pb2_grpc.RouterStub(self._router_ch)
        self._cache_ch = grpc.aio.insecure_channel(cache_address) if cache_address else None
        self.cache = cache_pb2_grpc.SemanticCacheStub(self._cache_ch) if self._cache_ch else None
        self.cache_timeout_s = cache_timeout_s

    async def close(self) -> None:
        await self._router_ch.close()
        if self._cache_ch is not None:
            await self._cache_ch.close()

    async def lookup(self, req: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse | None:
        if self.cache is None:
            return None
        try:
            return await self.cache.Lookup(req, timeout=self.cache_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("cache lookup failed: bypassing the cache", extra={"code": exc.code().name})
            return None

    async def store(self, req: cache_pb2.StoreRequest) -> bool:
        if self.cache is None:
            return False
        try:
            return (await self.cache.Store(req, timeout=self.cache_timeout_s * 4)).stored
        except grpc.aio.AioRpcError as exc:
            log.warning("cache store failed", extra={"code": exc.code().name})
            return False

    async def generate(self, req: inference_pb2.GenerateRequest,
                       timeout_s: float | None) -> AsyncIterator[inference_pb2.GenerateChunk]:
        call = self.router.Generate(req, timeout=timeout_s)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceededError("deadline exceeded while generating") from None
            raise UpstreamError(exc.code().name, exc.details() or exc.code().name) from None
        finally:
            call.cancel()
