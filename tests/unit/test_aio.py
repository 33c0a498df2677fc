"""services.common.aio.run: the service processes' event loop choice."""

from __future__ import annotations

import asyncio

import pytest

from services.common import aio


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_and_uvloop_run_on_uvloop_and_asyncio_on_the_standard_loop(monkeypatch):
    pytest.importorskip("uvloop")
    monkeypatch.delenv("STRATA_EVENT_LOOP", raising=False)
    assert aio.run(_loop_module()).startswith("uvloop")
    assert aio.run(_loop_module(), "uvloop").startswith("uvloop")
    assert aio.run(_loop_module(), "asyncio").startswith("asyncio")
    monkeypatch.setenv("STRATA_EVENT_LOOP", "asyncio")
    assert aio.run(_loop_module()).startswith("asyncio")


def test_an_unknown_choice_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv("STRATA_EVENT_LOOP", "trio")
    with pytest.raises(SystemExit, match="auto, uvloop, asyncio"):
        aio.run(_loop_module())
