"""The gateway's own errors and the Redis failures it degrades on (no grpc)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from redis.exceptions import RedisError

from services.common.errors import ResourceExhaustedError, UnavailableError

REDIS_ERRORS = (RedisError, OSError)    # the key, limit and usage stores are unreachable


class CapacityError(ResourceExhaustedError):
    """The suite is at capacity (not a per-key limit): `limit` names it in the gateway's metrics."""

    limit = "capacity"


@contextlib.contextmanager
def store_unavailable(what: str) -> Iterator[None]:
    """Redis unreachable during an admin call: UNAVAILABLE with a message, not gRPC's UNKNOWN."""
    try:
        yield
    except REDIS_ERRORS:
        raise UnavailableError(f"cannot {what} right now (key store unreachable)") from None
