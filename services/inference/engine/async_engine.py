"""Runs an LLMEngine on its own thread and serves asyncio callers.

The engine is touched only by its thread. Callers post commands (add, abort) to a queue; the
thread drains it before every step and delivers outputs to per-request asyncio queues. When a
caller stops listening (cancellation, deadline, disconnect) its request is aborted and its KV
blocks are freed at the start of the next step.

The engine is also *built* on its thread when AsyncEngine is given a factory (the service does so). With
libgomp every thread that opens an OpenMP region gets a thread pool of its own, and once the process
holds more pool threads than CPUs, every pool stops spinning at its barriers and sleeps on a futex
instead (GOMP's throttled spin). Loading runs parallel torch ops; had it run on the main thread, its
idle pool would throttle the engine's ~150 parallel regions a step: on 2 cores one stream decoded 20-30%
slower than in process (measured 2026-12-01; docs/architecture.md, "Threads").
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
from services.inference.engine.memory import release_freed_memory
from services.inference.engine.outputs import EngineStats, RequestOutput
from services.inference.sampling import SamplingParams

log = logging.getLogger(__name__)


Item = RequestOutput | BaseException


@dataclass(slots=True)
class _Listener:
    """Where a request's outputs go: an asyncio queue, filled on its loop's thread."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Item]
    unfinished: int = 1                        # its samples (SamplingParams.n) not yet finished


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    listener: _Listener
    num_speculative_tokens: int | None = None
    grammar: object = None                     # the response format's compiled grammar


def _put_all(items: list[tuple[asyncio.Queue[Item], Item]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _deliver(items: list[tuple[_Listener, Item]]) -> None:
    """Hands items to their loops: one wake-up per loop for a whole step's outputs, not one per request
    (a thread wake-up costs 70-200 us of CPU on the 2-core VMs measured, taken from the engine's cores)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Item], Item]]] = {}
    for listener, item in items:
        by_loop.setdefault(listener.loop, []).append((listener.queue, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:        # the caller's loop is closed: nobody is listening
            pass


@dataclass(slots=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_queued_requests: int | None = None,
                 on_fatal: Callable[[], None] | None = None) -> None:
        """engine: the engine, or a factory that builds it; a factory runs on the engine thread (the
        module's docstring says why), and its exception is raised here.
        on_fatal: called once (on the engine thread) when the engine dies of a device fault."""
        self.max_queued_requests = max_queued_requests   # None = unbounded waiting queue
        self.on_fatal = on_fatal
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._listeners: dict[str, _Listener] = {}
        self._stopped = threading.Event()
        self._go = threading.Event()                     # set by start(): the thread begins stepping
        self._num_in_flight = 0
        build = None if isinstance(engine, LLMEngine) else engine
        self._thread = threading.Thread(target=self._main, args=(build,), name="strata-engine", daemon=True)
        if build is None:
            self.engine = engine
        else:
            self._built = threading.Event()
            self._build_error: BaseException | None = None
            self._thread.start()
            self._built.wait()
            if self._build_error is not None:
                raise self._build_error
        self._stats = self.engine.stats()

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()
        self._go.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._commands.put(None)
        self._go.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def stats(self) -> EngineStats:
        """Snapshot taken after the latest step (safe from any thread)."""
        return self._stats

    async def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                       request_id: str | None = None, priority: int = 0, model: str = "",
                       num_speculative_tokens: int | None = None) -> AsyncIterator[RequestOutput]:
        """Stream outputs for one request. Raises InvalidRequestError before the first output.
        num_speculative_tokens: this request's k (0 = no speculation; None = the engine's setting). With
        params.n > 1 the samples' outputs interleave (RequestOutput.index); the stream ends once each has
        finished."""
        if self._stopped.is_set():
            raise UnavailableError("engine is shutting down")
        self.engine.check_request(prompt_token_ids, params, model)   # read-only: safe off-thread
        self.engine.check_speculative(num_speculative_tokens)
        grammar = None
        if params.response_format is not None:   # compiled here, on a worker thread: never inside a step
            grammar = await asyncio.to_thread(self.engine.compile_format, params.response_format)
        if self.max_queued_requests is not None and self._num_in_flight >= self.max_queued_requests:
            raise ResourceExhaustedError(
                f"replica is at capacity ({self._num_in_flight} requests in flight)", retry_after_s=1.0)
        request_id = request_id or uuid.uuid4().hex
        outputs: asyncio.Queue[Item] = asyncio.Queue()
        listener = _Listener(asyncio.get_running_loop(), outputs, params.n)
        self._num_in_flight += 1
        self._commands.put(_Add(request_id, list(prompt_token_ids), params, priority, listener, num_speculative_tokens,
                                grammar))
        finished, unfinished = False, params.n
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                unfinished -= item.finished
                finished = unfinished == 0
                yield item
                if finished:
                    return
        finally:
            self._num_in_flight -= 1
            if not finished:
                self._commands.put(_Abort(request_id))

    # engine thread
    def _main(self, build: Callable[[], LLMEngine] | None) -> None:
        if build is not None:
            try:
                self.engine = build()
            except BaseException as exc:  # noqa: BLE001 - raised by __init__ on the caller's thread
                self._build_error = exc
                return
            finally:
                self._built.set()
        self._go.wait()
        self._run()

    def _run(self) -> None:
        engine = self.engine
        stepped = False                          # steps ran since the heap was last trimmed
        # A step's outputs are held until the *next* step's longest stretch without the GIL begins
        # (ModelRunner.on_forward), rather than handed to the event loops as the step returns: the engine
        # then goes straight on in Python and torch calls that each drop the GIL for microseconds, the
        # woken loop took it at one of them for its whole turn (gRPC messages, ~0.2 ms a token), and the
        # engine thread slept on the GIL; waking a sleeping thread costs 0.1-0.5 ms on these VMs. Measured
        # 2026-12-02 at --threads 1 (a core free for the loop): 0.5-1.6 sleeps a step before, none after;
        # through gRPC, of in process, in alternating runs: one stream 0.82-0.86 -> 0.90-0.93, 8 streams
        # 0.81-0.90 -> 0.88-1.00. With two threads on two cores the change is within the noise: there the
        # loop's CPU is what it costs, wherever in the step it runs.
        # Held outputs go at once when no step follows (idle, aborted, or a step without a forward).
        held: list[tuple[_Listener, Item]] = []

        def release_held() -> None:
            if held:
                _deliver(held)
                held.clear()

        engine.runner.on_forward = release_held
        try:
            while not self._stopped.is_set():
                block = not engine.has_unfinished_requests()
                if block and stepped:
                    # idle again: a burst's activations (prefill chunks, large batches) stay in glibc's heap
                    # after they are freed; handing the pages back here costs no request any time (a few
                    # ms, once per burst) and brings the replica's RSS back to its resting size
                    release_freed_memory()
                    stepped = False
                if not self._drain(block):
                    break
                if not engine.has_unfinished_requests():
                    release_held()
                    continue
                stepped = True
                try:
                    outputs = engine.step()
                except EngineDeadError as exc:         # every request failed: their callers get UNAVAILABLE
                    release_held()
                    _deliver([(listener, exc) for listener in self._listeners.values()])
                    self._listeners.clear()
                    self._stats = engine.stats()
                    if self.on_fatal is not None:
                        self.on_fatal()
                    continue
                except Exception:  # noqa: BLE001 - the loop must survive anything
                    log.exception("engine step crashed")
                    outputs = []
                release_held()                            # still held: the step ran no forward pass
                for out in outputs:
                    listener = self._listeners.get(out.request_id)
                    if listener is not None:
                        held.append((listener, out))
                        if out.finished:
                            listener.unfinished -= 1
                            if listener.unfinished == 0:
                                del self._listeners[out.request_id]
                if not engine.has_unfinished_requests():
                    release_held()                        # no step follows
                self._stats = engine.stats()
        finally:
            release_held()
            engine.runner.on_forward = None
        # shutting down: fail what is left
        for request_id in self._listeners:
            engine.abort_request(request_id)
        _deliver([(listener, UnavailableError("engine shut down")) for listener in self._listeners.values()])
        self._listeners.clear()

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
                                            priority=cmd.priority, num_speculative_tokens=cmd.num_speculative_tokens,
                                            grammar=cmd.grammar)
                    self._listeners[cmd.request_id] = cmd.listener
                except Exception as exc:  # noqa: BLE001 - reported to the caller
                    _deliver([(cmd.listener, exc)])
            else:
                self._listeners.pop(cmd.request_id, None)
                self.engine.abort_request(cmd.request_id)
            self._stats = self.engine.stats()
