"""AsyncStrataClient: the gateway from asyncio code (grpc.aio), with the sync client's surface."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Unpack

import grpc

from services.client.base import ClientBase
from services.client.errors import from_rpc_error
from services.client.request import CachePolicy, Prompt, Sampling
from services.client.results import Chunk, Result, chunk_from_proto, result_from_proto
from services.client.retry import Attempts, RetryPolicy
from services.common.pb import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)


class AsyncStrataClient(ClientBase):
    """StrataClient for asyncio: the same arguments, `await generate(...)` and `async for ... in stream(...)`.
    Create it on the event loop that uses it; `async with` or `await close()`."""

    def __init__(self, target: str, api_key: str, *, model: str = "", timeout: float | None = 60.0,
                 retry: RetryPolicy | None = None, credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(target, api_key, model=model, timeout=timeout, retry=retry)
        self._channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                         else grpc.aio.insecure_channel(target, options))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    async def __aenter__(self) -> AsyncStrataClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: Prompt, *, model: str | None = None, cache: CachePolicy | None = None,
                       priority: int = 0, allow_sampled_cache: bool = False, timeout: float | None = None, user: str = "",
                       **sampling: Unpack[Sampling]) -> Result:
        """The whole answer; arguments, retries and errors as StrataClient.generate."""
        req, attempts = self._prepare(prompt, model, cache, priority, allow_sampled_cache, timeout, sampling, user)
        while True:
            try:
                return result_from_proto(await self._stub.Generate(req, timeout=attempts.next_timeout(),
                                                                   metadata=self._metadata))
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                delay = attempts.retry_delay(error)
                if delay is None:
                    raise error from exc
            log.info("gateway call failed, retrying", extra={"code": error.code.name, "call": attempts.num_calls})
            await asyncio.sleep(delay)

    def stream(self, prompt: Prompt, *, model: str | None = None, cache: CachePolicy | None = None,
               priority: int = 0, allow_sampled_cache: bool = False, timeout: float | None = None, user: str = "",
               **sampling: Unpack[Sampling]) -> AsyncIterator[Chunk]:
        """The answer as it is generated; arguments and retries (before the first chunk only) as
        StrataClient.stream. Leaving the loop early cancels the call."""
        req, attempts = self._prepare(prompt, model, cache, priority, allow_sampled_cache, timeout, sampling, user)
        return self._stream(req, attempts)

    async def _stream(self, req: gateway_pb2.GatewayRequest, attempts: Attempts) -> AsyncIterator[Chunk]:
        while True:
            call = self._stub.GenerateStream(req, timeout=attempts.next_timeout(), metadata=self._metadata)
            yielded = False
            try:
                async for msg in call:
                    yielded = True
                    yield chunk_from_proto(msg)
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                delay = None if yielded else attempts.retry_delay(error)
                if delay is None:
                    raise error from exc
            finally:
                call.cancel()
            log.info("gateway stream failed before its first chunk, retrying",
                     extra={"code": error.code.name, "call": attempts.num_calls})
            await asyncio.sleep(delay)
