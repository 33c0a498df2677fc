"""The one place that turns domain errors into gRPC statuses."""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

from services.common.errors import InvalidArgumentError, ResourceExhaustedError, StrataError
from services.common.retry_after import retry_after_metadata
from services.common.telemetry import finish_server_span, server_span

log = logging.getLogger(__name__)

# A status message travels in trailing metadata, which gRPC caps at 16 KiB a header: a message that echoes
# a huge field back (an unknown 16 KB model name) would turn INVALID_ARGUMENT into a transport error.
MAX_DETAILS_CHARS = 1024


def bounded_details(message: str) -> str:
    """The message, cut to MAX_DETAILS_CHARS characters (with an ellipsis) when longer."""
    return message if len(message) <= MAX_DETAILS_CHARS else message[:MAX_DETAILS_CHARS - 1] + "…"


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request whose bytes do not parse (a string field that is not UTF-8, corrupt wire data), as a
    tolerant deserializer hands it to the servicer: map_errors answers it INVALID_ARGUMENT. (gRPC itself
    would answer a deserializer's exception with UNKNOWN "Unexpected DecodeError".)"""

    data: bytes
    reason: str


def tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """The deserializer, returning Undecodable instead of raising DecodeError."""
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return Undecodable(data, f"the request does not parse: {exc}")
    return parse


def _check_decoded(request: Any) -> None:
    if request.__class__ is Undecodable:
        raise InvalidArgumentError(request.reason)


def status_code(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, StrataError):
        return grpc.StatusCode[exc.status]
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Abort the RPC with the status for exc (internal errors get a generic message)."""
    if isinstance(exc, ResourceExhaustedError) and exc.retry_after_s is not None:
        context.set_trailing_metadata(retry_after_metadata(exc.retry_after_s))
    if isinstance(exc, StrataError):
        await context.abort(status_code(exc), bounded_details(str(exc)))
    log.error("internal error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")


def map_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a servicer method (unary or server-streaming) so domain errors become statuses.

    The same wrapper opens the call's SERVER span (telemetry.server_span: the servicer's `tracer`,
    named `SERVICE/Method`, child of the caller's trace context; none for methods in `UNTRACED`), so a
    call pays for one wrapper, not also for a server interceptor. A request that did not parse
    (Undecodable, from GrpcServer's tolerant deserializers) is INVALID_ARGUMENT."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            with server_span(self, name, context) as span:
                try:
                    _check_decoded(request)
                    async for item in method(self, request, context):
                        yield item
                except (StrataError, ValueError, RuntimeError, KeyError, TypeError) as exc:
                    await abort_with(context, exc)
                finally:
                    finish_server_span(span, context)
        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with server_span(self, name, context) as span:
            try:
                _check_decoded(request)
                return await method(self, request, context)
            except (StrataError, ValueError, RuntimeError, KeyError, TypeError) as exc:
                await abort_with(context, exc)
            finally:
                finish_server_span(span, context)
    return unary
