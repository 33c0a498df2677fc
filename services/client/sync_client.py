"""StrataClient: the gateway from blocking code (grpc's sync API), with deadlines, retries and typed
results and errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, Unpack

import grpc

from services.client.base import ClientBase
from services.client.errors import from_rpc_error
from services.client.request import CachePolicy, Prompt, Sampling
from services.client.results import Chunk, Result, chunk_from_proto, result_from_proto
from services.client.retry import Attempts, RetryPolicy
from services.common.pb import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)


class StrataClient(ClientBase):
    """A blocking client of strata.v1.Gateway over one channel; thread-safe, use it as a context manager
    or call close().

    `timeout` is the default deadline of a call in seconds, retries included (None: no deadline);
    `credentials` makes the channel TLS; `options` are grpc channel options."""

    def __init__(self, target: str, api_key: str, *, model: str = "", timeout: float | None = 60.0,
                 retry: RetryPolicy | None = None, credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(target, api_key, model=model, timeout=timeout, retry=retry)
        self._channel = (grpc.secure_channel(target, credentials, options) if credentials
                         else grpc.insecure_channel(target, options))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def __enter__(self) -> StrataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: Prompt, *, model: str | None = None, cache: CachePolicy | None = None,
                 priority: int = 0, allow_sampled_cache: bool = False, timeout: float | None = None, user: str = "",
                 **sampling: Unpack[Sampling]) -> Result:
        """The whole answer to `prompt` (text, or a list of {"role", "content"} dicts or (role, content)
        tuples). `model` None = the client's; `cache` "use" (the server's default), "bypass" or "refresh";
        `priority` lower runs sooner; `allow_sampled_cache` also caches answers with temperature > 0;
        `timeout` None = the client's; `user` the end user (usage is also counted per user); `sampling` as
        SamplingParams (max_tokens=32, temperature=0.0, logprobs=2, n=3...).
        UNAVAILABLE is retried per the client's RetryPolicy; other failures raise a StrataClientError subclass."""
        req, attempts = self._prepare(prompt, model, cache, priority, allow_sampled_cache, timeout, sampling, user)
        while True:
            try:
                return result_from_proto(self._stub.Generate(req, timeout=attempts.next_timeout(),
                                                             metadata=self._metadata))
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                delay = attempts.retry_delay(error)
                if delay is None:
                    raise error from exc
            log.info("gateway call failed, retrying", extra={"code": error.code.name, "call": attempts.num_calls})
            time.sleep(delay)

    def stream(self, prompt: Prompt, *, model: str | None = None, cache: CachePolicy | None = None,
               priority: int = 0, allow_sampled_cache: bool = False, timeout: float | None = None, user: str = "",
               **sampling: Unpack[Sampling]) -> Iterator[Chunk]:
        """The answer as it is generated, with generate's arguments. Retried only until the first chunk
        was yielded: after that an UNAVAILABLE raises ServiceUnavailableError rather than start the answer again.
        Leaving the loop early cancels the call."""
        req, attempts = self._prepare(prompt, model, cache, priority, allow_sampled_cache, timeout, sampling, user)
        return self._stream(req, attempts)

    def _stream(self, req: gateway_pb2.GatewayRequest, attempts: Attempts) -> Iterator[Chunk]:
        while True:
            call = self._stub.GenerateStream(req, timeout=attempts.next_timeout(), metadata=self._metadata)
            yielded = False
            try:
                for msg in call:
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
            time.sleep(delay)
