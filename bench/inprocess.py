"""Strata's engine in process, as `strata generate` runs it: the yardstick for what the service costs.

The engine runs in a child process of its own (spawned, so it shares no OpenMP pool or GIL with the
bench or the peers), built from the same flags `strata serve inference` takes, and steps on the
child's main thread exactly as `strata generate` does. Each phase is the same closed loop as the gRPC
client's (bench/strata.py): `concurrency` requests in flight, a new one added as one finishes, every
output token stamped when its step returns.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from types import TracebackType

from bench.metrics import PhaseResult, RequestTiming


def _closed_loop(engine, prompts: list[list[int]], max_tokens: int, concurrency: int) -> PhaseResult:
    from services.inference.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    todo = iter(prompts)
    timings: dict[str, RequestTiming] = {}
    done: list[RequestTiming] = []

    def add_next() -> None:
        prompt = next(todo, None)
        if prompt is not None:
            sent = time.perf_counter()
            timings[engine.add_request(prompt, params)] = RequestTiming(sent_s=sent)

    start = time.perf_counter()
    for _ in range(concurrency):
        add_next()
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            timing = timings[out.request_id]
            timing.arrivals_s.extend([now] * len(out.new_token_ids))
            if out.finished:
                if timing.num_output_tokens != max_tokens:
                    raise RuntimeError(f"expected {max_tokens} output tokens, got {timing.num_output_tokens}")
                done.append(timings.pop(out.request_id))
                add_next()
    return PhaseResult(concurrency, max(t.arrivals_s[-1] for t in done) - start, tuple(done))


def _child(conn, dtype: str, extra_args: list[str]) -> None:
    import argparse

    from services.inference.config import engine_config_from_args
    from services.inference.engine.factory import build_engine
    from services.inference.main import add_serve_args

    # the flags of `strata serve inference`, so a configuration's flags mean the same on every path; only
    # the engine's take effect here (the service's own, e.g. --stream-interval, shape its messages only)
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    engine = build_engine(engine_config_from_args(parser.parse_args(["--dtype", dtype, *extra_args])))
    m = engine.config.model
    conn.send(("ready", f"{m.quantization} blocks" if m.quantization else f"dense {m.dtype}"))
    while (job := conn.recv()) is not None:
        try:
            conn.send(("ok", _closed_loop(engine, *job)))
        except Exception as exc:  # noqa: BLE001 - reported to the bench
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class InProcessEngine:
    """The engine in a spawned child; `run_phase` has bench.strata.run_phase's signature."""

    def __init__(self, dtype: str, extra_args: list[str] | None = None) -> None:
        self.args = (dtype, list(extra_args or []))
        self.description = ""      # what the engine runs, as resolved ("gguf blocks", "dense float32")

    def __enter__(self) -> "InProcessEngine":
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child, *self.args), daemon=True)
        self._proc.start()
        _, self.description = self._recv()
        return self

    def _recv(self):
        while not self._conn.poll(1.0):
            if not self._proc.is_alive():
                raise RuntimeError(f"the in-process engine exited with {self._proc.exitcode}")
        kind, value = self._conn.recv()
        if kind == "error":
            raise RuntimeError(value)
        return kind, value

    def run_phase(self, prompts: list[list[int]], max_tokens: int, concurrency: int) -> PhaseResult:
        self._conn.send((prompts, max_tokens, concurrency))
        return self._recv()[1]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc.is_alive():
            self._conn.send(None)
            self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
