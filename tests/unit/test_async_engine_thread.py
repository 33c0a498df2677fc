"""The async engine owns one thread: given a factory it builds the engine there (with libgomp every thread
that opens an OpenMP region keeps a pool, and a second idle pool throttles the engine's barriers), steps it
there, raises the factory's error to its caller, and hands a step's outputs to each event loop at once."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

from services.inference.engine.async_engine import AsyncEngine
from services.inference.sampling import SamplingParams
from tests.conftest import assert_all_blocks_free

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


async def generate_three(async_engine: AsyncEngine) -> list[list]:
    """Three requests of 6 tokens at once through a started engine: each one's outputs."""
    async def run(prompt):
        return [out async for out in async_engine.generate(prompt, PARAMS)]
    return await asyncio.wait_for(asyncio.gather(*(run(list(range(100 + i, 120 + i))) for i in range(3))), 60)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_factory_builds_the_engine_on_the_thread_that_steps_it(make_engine, monkeypatch):
    threads: dict[str, int] = {}

    def build():
        threads["build"] = threading.get_ident()
        engine = make_engine("float32")
        step = engine.step

        def recording_step():
            threads["step"] = threading.get_ident()
            return step()
        monkeypatch.setattr(engine, "step", recording_step)
        return engine

    async_engine = AsyncEngine(build)
    async_engine.start()
    try:
        outs = await generate_three(async_engine)
    finally:
        async_engine.shutdown()
    assert threads["build"] == threads["step"] != threading.get_ident()
    for out in outs:
        assert sum(len(o.new_token_ids) for o in out) == 6 and out[-1].finish_reason == "length"
    assert_all_blocks_free(async_engine.engine)


def test_the_factorys_error_reaches_the_caller():
    def build():
        raise FileNotFoundError("no such model file: nowhere.gguf")
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        AsyncEngine(build)


@pytest.mark.asyncio(loop_scope="session")
async def test_shutdown_before_start_returns(make_engine):
    async_engine = AsyncEngine(lambda: make_engine("float32"))
    async_engine.shutdown(timeout=5)
    assert not async_engine._thread.is_alive()


@pytest.mark.asyncio(loop_scope="session")
async def test_the_heap_is_trimmed_once_each_time_the_engine_goes_idle(make_engine, monkeypatch):
    """A burst's freed activations go back to the OS when the engine runs out of work (once per burst, on
    the engine thread), never between the steps of a burst."""
    import services.inference.engine.async_engine as async_module

    trims: list[tuple[int, bool]] = []
    real = async_module.release_freed_memory
    engine = make_engine("float32")

    def spy():
        trims.append((threading.get_ident(), engine.has_unfinished_requests()))
        real()
    monkeypatch.setattr(async_module, "release_freed_memory", spy)
    async_engine = AsyncEngine(engine)
    async_engine.start()
    try:
        for burst in (1, 2):
            await generate_three(async_engine)
            for _ in range(100):                       # the engine thread notices it is idle
                if len(trims) == burst:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            assert len(trims) == burst                 # once per burst, and not again while idle
    finally:
        async_engine.shutdown()
    assert {ident for ident, _ in trims} == {async_engine._thread.ident}
    assert not any(busy for _, busy in trims)


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("quantization", [None, "gguf"])
async def test_outputs_go_to_the_loop_as_the_next_forward_drops_the_gil(make_engine, monkeypatch, quantization):
    """A step's outputs are handed over as the next step's layer stack begins its C++ call (no GIL for the
    whole stack), or just before the next forward on the other paths; only the last, with no step after
    it, goes from the engine loop itself. Handed over as each step returned, the woken event loop took the
    GIL from the engine in the middle of its Python."""
    import kernels
    import services.inference.engine.async_engine as async_module

    if quantization and not kernels.available():
        pytest.skip("kernels not built (make install)")
    callers: list[tuple[str, str]] = []
    real = async_module._deliver

    def spy(items):
        if items:
            frame = sys._getframe(2)                         # _deliver <- release_held <- who released
            callers.append((Path(frame.f_code.co_filename).name, frame.f_code.co_name))
        real(items)
    monkeypatch.setattr(async_module, "_deliver", spy)
    engine = make_engine("float32", quantization=quantization)
    assert (engine.runner.compute.layer_stack is not None) == (quantization == "gguf")
    async_engine = AsyncEngine(engine)
    async_engine.start()
    try:
        outs = await generate_three(async_engine)
    finally:
        async_engine.shutdown()
    for out in outs:
        assert sum(len(o.new_token_ids) for o in out) == 6 and out[-1].finish_reason == "length"
    before_forward = ("stack.py", "run") if quantization else ("model_runner.py", "execute")
    assert callers[-1] == ("async_engine.py", "_run")
    assert callers.count(before_forward) >= 5, callers
    assert set(callers[:-1]) <= {before_forward, ("model_runner.py", "execute")}, callers
    assert_all_blocks_free(engine)
