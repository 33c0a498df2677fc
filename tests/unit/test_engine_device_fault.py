"""A sticky GPU error (illegal memory access and the like) kills the engine cleanly: every request fails
and frees its blocks, new requests get UNAVAILABLE, the async engine tells its callers and calls on_fatal
(the inference service then stops itself for its supervisor to restart). Faults are injected into the
model step; ordinary step errors still fail only the step's requests."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import UnavailableError
from services.inference.engine.async_engine import AsyncEngine
from services.inference.engine.engine import EngineDeadError, is_device_fault
from services.inference.sampling import SamplingParams
from tests.conftest import assert_all_blocks_free

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_device_faults_are_told_apart_from_other_errors():
    assert is_device_fault(RuntimeError("paged_attention: an illegal memory access was encountered"))
    assert is_device_fault(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_device_fault(RuntimeError("shape mismatch"))
    assert not is_device_fault(ValueError("CUDA error"))


def _fault(*_args, **_kwargs):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_device_fault_fails_every_request_frees_blocks_and_refuses_new_ones(make_engine, monkeypatch):
    engine = make_engine("float32")
    for n in (5, 9, 30):
        engine.add_request(list(range(100, 100 + n)), PARAMS)
    engine.step()                                          # a healthy step first
    monkeypatch.setattr(engine.runner, "execute", _fault)
    with pytest.raises(EngineDeadError, match="device fault"):
        engine.step()
    assert_all_blocks_free(engine)
    with pytest.raises(UnavailableError, match="restart the replica"):
        engine.add_request([1, 2, 3], PARAMS)


def test_an_ordinary_step_error_fails_only_that_step(make_engine, monkeypatch):
    engine = make_engine("float32")
    engine.add_request(list(range(100, 110)), PARAMS)
    monkeypatch.setattr(engine.runner, "execute", lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    outs = engine.step()
    assert [o.finish_reason for o in outs] == ["error"]
    monkeypatch.undo()                                     # still serving
    assert engine.generate([list(range(5, 15))], PARAMS)[0].finish_reason == "length"


@pytest.mark.asyncio(loop_scope="session")
async def test_the_async_engine_answers_unavailable_and_calls_on_fatal(make_engine, monkeypatch):
    engine = make_engine("float32")
    called = []
    async_engine = AsyncEngine(engine, on_fatal=lambda: called.append(True))
    async_engine.start()
    try:
        monkeypatch.setattr(engine.runner, "execute", _fault)
        async def run(prompt):
            async for _ in async_engine.generate(prompt, PARAMS):
                pass
        with pytest.raises(UnavailableError, match="device fault"):
            await asyncio.wait_for(run(list(range(100, 120))), 30)
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(run([1, 2, 3]), 30)
        for _ in range(50):
            if called:
                break
            await asyncio.sleep(0.01)
        assert called == [True]
        assert_all_blocks_free(engine)
    finally:
        async_engine.shutdown()
