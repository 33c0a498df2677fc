"""The `retry-after` trailing metadata of a RESOURCE_EXHAUSTED answer, written and read in one place: the
servicers' error mapping writes it, the client library and the gateway's downstream calls read it."""

from __future__ import annotations

import math
from typing import Any, Iterable

RETRY_AFTER = "retry-after"


def retry_after_metadata(seconds: float) -> tuple[tuple[str, str], ...]:
    """Trailing metadata telling the caller to wait `seconds` (whole seconds, at least 1) before retrying."""
    return ((RETRY_AFTER, str(max(1, math.ceil(seconds)))),)


def read_retry_after(metadata: Iterable[tuple[str, Any]] | None) -> float | None:
    """The `retry-after` value of trailing metadata, in seconds (None when absent or malformed)."""
    for key, value in metadata or ():
        if key == RETRY_AFTER:
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None


def retry_after_s(exc: Any) -> float | None:
    """The `retry-after` of a failed call (a grpc.RpcError, sync or asyncio), in seconds, or None."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return read_retry_after(trailing)
