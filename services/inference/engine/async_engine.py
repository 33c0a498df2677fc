"""Runs an LLMEngine on its own thread and serves asyncio callers.

The engine is touched only by its thread. Callers post commands (add, abort) to a queue; the
thread drains it before every step and delivers outputs to per-request asyncio queues. When a
caller stops listening (cancellation, deadline, disconnect) its request is aborted and its KV
blocks are freed at the start of the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence

from services.common.errors import ResourceExhaustedError, UnavailableError
from services.inference.engine.engine import EngineDeadError, LLMEngine
from services.inference.engine.outputs import EngineStats, RequestOutput
from services.inference.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    deliver: Callable[[RequestOutput | BaseException], None]
    num_speculative_tokens: int | None = None


@dataclass(slots=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queued_requests: int | None = None,
                 on_fatal: Callable[[], None] | None = None) -> None:
        """on_fatal: called once (on the engine thread) when the engine dies of a device fault."""
        self.engine = engine
        self.max_queued_requests = max_queued_requests   # None = unbounded waiting queue
        self.on_fatal = on_fatal
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._delivery: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._stats = engine.stats()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="strata-engine", daemon=True)
        self._num_in_flight = 0

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._commands.put(None)
        self._thread.join(timeout)

    @property
    def stats(self) -> EngineStats:
        """Snapshot taken after the latest step (safe from any thread)."""
        return self._stats

    async def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                       request_id: str | None = None, priority: int = 0, model: str = "",
                       num_speculative_tokens: int | None = None) -> AsyncIterator[RequestOutput]:
        """Stream outputs for one request. Raises InvalidRequestError before the first output.
        num_speculative_tokens: this request's k (0 = no speculation; None = the engine's setting)."""
        if self._stopped.is_set():
            raise UnavailableError("engine is shutting down")
        self.engine.check_request(prompt_token_ids, params, model)   # read-only: safe off-thread
        self.engine.check_speculative(num_speculative_tokens)
        if self.max_queued_requests is not None and self._num_in_flight >= self.max_queued_requests:
            raise ResourceExhaustedError(
                f"replica is at capacity ({self._num_in_flight} requests in flight)", retry_after_s=1.0)
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def deliver(item: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        self._num_in_flight += 1
        self._commands.put(_Add(request_id, list(prompt_token_ids), params, priority, deliver, num_speculative_tokens))
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._num_in_flight -= 1
            if not finished:
                self._commands.put(_Abort(request_id))

    # engine thread
    def _run(self) -> None:
        engine = self.engine
        while not self._stopped.is_set():
            block = not engine.has_unfinished_requests()
            if not self._drain(block):
                break
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except EngineDeadError as exc:         # every request failed: their callers get UNAVAILABLE
                for deliver in self._delivery.values():
                    deliver(exc)
                self._delivery.clear()
                self._stats = engine.stats()
                if self.on_fatal is not None:
                    self.on_fatal()
                continue
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("engine step crashed")
                outputs = []
            for out in outputs:
                deliver = self._delivery.get(out.request_id)
                if out.finished:
                    self._delivery.pop(out.request_id, None)
                if deliver is not None:
                    deliver(out)
            self._stats = engine.stats()
        # shutting down: fail what is left
        for request_id, deliver in list(self._delivery.items()):
            engine.abort_request(request_id)
            deliver(UnavailableError("engine shut down"))
        self._delivery.clear()

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; with block=True wait for the first. False when told to stop."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd is None:
                return False
            if isinstance(cmd, _Add):
                try:
                    self.engine.add_request(cmd.prompt_token_ids, cmd.params, request_id=cmd.request_id,
                                            priority=cmd.priority, num_speculative_tokens=cmd.num_speculative_tokens)
                    self._delivery[cmd.request_id] = cmd.deliver
                except Exception as exc:  # noqa: BLE001 - reported to the caller
                    cmd.deliver(exc)
            else:
                self._delivery.pop(cmd.request_id, None)
                self.engine.abort_request(cmd.request_id)
            self._stats = self.engine.stats()
