"""What a failed call raises: one exception per status a caller handles differently, all StrataClientError.

Named apart from the services' own errors (services/common/errors.py), which are what a server raises."""

from __future__ import annotations

import grpc

from services.common.retry_after import retry_after_s


class StrataClientError(Exception):
    """A call that ended with a non-OK status: `code` is the gRPC status, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class AuthError(StrataClientError):
    """UNAUTHENTICATED (missing, unknown or revoked key) or PERMISSION_DENIED (a model the key may not use,
    a blocked prompt)."""


class InvalidRequestError(StrataClientError):
    """INVALID_ARGUMENT: the request itself is wrong (max_tokens out of range, a bad role, chat messages to
    a completions-only model...); do not retry."""


class NotFoundError(InvalidRequestError):
    """NOT_FOUND: the model named is not served (ListModels lists those that are); do not retry."""


class RateLimitedError(StrataClientError):
    """RESOURCE_EXHAUSTED: a per-key limit or budget. `retry_after_s` is the server's `retry-after`
    (None when it sent none, e.g. a spent budget)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None) -> None:
        super().__init__(code, details)
        self.retry_after_s = retry_after_s


class ServiceUnavailableError(StrataClientError):
    """UNAVAILABLE after the client's retries, or mid-stream (never retried once a chunk was yielded)."""


class CallTimeoutError(StrataClientError):
    """DEADLINE_EXCEEDED: the call's deadline (`timeout`) passed."""


_BY_CODE: dict[grpc.StatusCode, type[StrataClientError]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: CallTimeoutError,
}


def from_rpc_error(exc: grpc.RpcError) -> StrataClientError:
    """The typed error for a failed sync or asyncio call."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RateLimitedError(code, details, retry_after_s(exc))
    return _BY_CODE.get(code, StrataClientError)(code, details)
