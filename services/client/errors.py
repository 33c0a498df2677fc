"""What a failed call raises: one exception per status a caller handles differently, all StrataError."""

from __future__ import annotations

import grpc


class StrataError(Exception):
    """A call that ended with a non-OK status: `code` is the gRPC status, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class AuthError(StrataError):
    """UNAUTHENTICATED (missing, unknown or revoked key) or PERMISSION_DENIED (a model the key may not use,
    a blocked prompt)."""


class InvalidArgumentError(StrataError):
    """The request itself is wrong (unknown model, max_tokens out of range, a bad role...); do not retry."""


class RateLimitedError(StrataError):
    """RESOURCE_EXHAUSTED: a per-key limit or budget. `retry_after_s` is the server's `retry-after`
    (None when it sent none, e.g. a spent budget)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None) -> None:
        super().__init__(code, details)
        self.retry_after_s = retry_after_s


class UnavailableError(StrataError):
    """UNAVAILABLE after the client's retries, or mid-stream (never retried once a chunk was yielded)."""


class DeadlineExceededError(StrataError):
    """The call's deadline (`timeout`) passed."""


_BY_CODE: dict[grpc.StatusCode, type[StrataError]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def retry_after_s(exc: grpc.RpcError) -> float | None:
    """The `retry-after` trailing metadata of a failed call, in seconds (None if absent or malformed)."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == "retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None


def from_rpc_error(exc: grpc.RpcError) -> StrataError:
    """The typed error for a failed sync or asyncio call."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RateLimitedError(code, details, retry_after_s(exc))
    return _BY_CODE.get(code, StrataError)(code, details)
