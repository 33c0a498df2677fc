"""Circuit breaker per replica: closed → open after `failure_threshold` failures within `window_s`;
open → half-open after `cooldown_s`, or at once when the replica's health check passes again;
half-open lets one probe through: success closes, failure reopens. No grpc, no asyncio: the router
calls allow/success/failure around each attempt, the replica's health watch calls health_restored."""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 5, window_s: float = 30.0, cooldown_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1 or window_s <= 0 or cooldown_s < 0:
            raise ValueError("failure_threshold >= 1, window_s > 0 and cooldown_s >= 0 are required")
        self.failure_threshold, self.window_s, self.cooldown_s = failure_threshold, window_s, cooldown_s
        self._clock = clock
        self._failures: deque[float] = deque()
        self._half_open_at: float | None = None    # None: closed
        self._probing = False
        self.opened = 0          # times the circuit opened (for ListBackends and metrics)

    @property
    def state(self) -> str:
        if self._half_open_at is None:
            return CLOSED
        return HALF_OPEN if self._clock() >= self._half_open_at else OPEN

    def allow(self) -> bool:
        """Whether a request may go to this replica now; in half-open, only one probe at a time."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self._failures.clear()
        self._half_open_at = None
        self._probing = False

    def record_failure(self) -> None:
        now = self._clock()
        if self.state == HALF_OPEN:              # the probe failed: another cool-down
            self._open(now)
            return
        self._failures.append(now)
        while self._failures and self._failures[0] < now - self.window_s:
            self._failures.popleft()
        if self._half_open_at is None and len(self._failures) >= self.failure_threshold:
            self._open(now)

    def release(self) -> None:
        """An attempt ended without a verdict on the replica (the caller went away): free the probe slot."""
        self._probing = False

    def health_restored(self) -> None:
        """The replica's health check passed after failing: an open circuit turns half-open now, without
        waiting out the cool-down (the next request is the probe)."""
        if self.state == OPEN:
            self._half_open_at = self._clock()

    def _open(self, now: float) -> None:
        self._half_open_at = now + self.cooldown_s
        self._probing = False
        self._failures.clear()
        self.opened += 1
