"""When a failed call is tried again: the policy (which statuses, how often, how long to wait) and one
request's bookkeeping (its shared deadline, the calls it has made). No sleeping here: the sync and the
asyncio client each wait in their own way."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from services.client.errors import CallTimeoutError, RateLimitedError, StrataClientError


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    max_attempts: int = 3             # calls per request, the first included; 1 = never retry
    backoff_base_s: float = 0.1       # wait before the second call, doubled for each one after
    backoff_max_s: float = 2.0        # cap on one wait (before jitter)
    # RESOURCE_EXHAUSTED is left out on purpose: a rate limit wants the caller's decision (RateLimitedError
    # has the server's retry-after); add it here to wait for retry-after and try again instead
    retry_on: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {self.max_attempts}")

    def backoff_s(self, num_failed: int) -> float:
        """Wait after `num_failed` failed calls: exponential, capped, with jitter (half to all of it)."""
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** (num_failed - 1)) * random.uniform(0.5, 1.0)


class Attempts:
    """One request's calls: the deadline they share and whether, and after how long, to call again."""

    def __init__(self, policy: RetryPolicy, timeout_s: float | None) -> None:
        self.policy = policy
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.num_calls = 0

    def next_timeout(self) -> float | None:
        """Seconds the next call may take (None: no deadline), counting the call; CallTimeoutError
        when none are left."""
        self.num_calls += 1
        if self.deadline is None:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise CallTimeoutError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"deadline exceeded after {self.num_calls - 1} call(s)")
        return remaining

    def retry_delay(self, error: StrataClientError) -> float | None:
        """Seconds to wait before calling again after `error`, or None: give up and raise it (not a
        retried status, no attempts left, or the wait would outlast the deadline)."""
        if error.code not in self.policy.retry_on or self.num_calls >= self.policy.max_attempts:
            return None
        delay = self.policy.backoff_s(self.num_calls)
        if isinstance(error, RateLimitedError) and error.retry_after_s is not None:
            delay = max(delay, error.retry_after_s)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        return delay
