"""Domain errors shared by every service. No grpc here: services/common/grpc_errors.py maps them."""

from __future__ import annotations


class StrataError(Exception):
    """Base class; `status` names the gRPC status code the servicers answer with."""

    status = "INTERNAL"


class InvalidArgumentError(StrataError, ValueError):
    status = "INVALID_ARGUMENT"


class NotFoundError(StrataError):
    status = "NOT_FOUND"


class FailedPreconditionError(StrataError):
    """The thing asked for is in a state that does not allow it (e.g. changing a revoked key)."""

    status = "FAILED_PRECONDITION"


class UnauthenticatedError(StrataError):
    status = "UNAUTHENTICATED"


class PermissionDeniedError(StrataError):
    status = "PERMISSION_DENIED"


class ResourceExhaustedError(StrataError):
    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(StrataError):
    status = "UNAVAILABLE"


class DeadlineExceededError(StrataError):
    status = "DEADLINE_EXCEEDED"


class UpstreamError(StrataError):
    """A status a downstream service answered with, passed on unchanged (e.g. INVALID_ARGUMENT)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
