"""The router follows a replica's health back: a replica whose circuit opened while it was down is
routed to within a second of reporting SERVING again, neither after the rest of the circuit's cool-down
nor after gRPC's reconnect backoff, which has grown to seconds by then (real replicas and router on
port 0; the cool-down is far longer than the replica stays down)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from tests.integration.test_router import Suite, chat, until

pytestmark = pytest.mark.asyncio(loop_scope="session")

COOLDOWN_S = 30.0      # the circuit would stay open this long after the failures that opened it
DOWN_S = 10.0          # the replica restarting (loading its model) meanwhile


@pytest.fixture()
async def suite(make_engine):
    s = Suite(make_engine)
    yield s
    await s.close()


async def _fails(call: grpc.aio.UnaryStreamCall) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while await call.read() is not grpc.aio.EOF:
            pass
    return err.value.code()


async def test_a_replica_back_to_serving_is_routed_to_within_a_second_while_the_cooldown_still_runs(suite):
    a = await suite.replica("r-a")
    port = int(a.rsplit(":", 1)[1])
    router = await suite.router([a], backend={"failure_threshold": 2, "open_cooldown_s": COOLDOWN_S})
    backend = suite.routers[-1].router.backends[a]

    # down: the two streams it was serving fail, which opens its circuit
    calls = [router.Generate(chat(f"Tell me a long story, take {i}.", max_tokens=400, ignore_eos=True), timeout=60)
             for i in range(2)]
    for call in calls:
        await call.read()
    await suite.kill(a)
    assert [await _fails(call) for call in calls] == [grpc.StatusCode.UNAVAILABLE] * 2
    assert backend.circuit.state == "open" and backend.circuit.opened == 1
    await until(lambda: not backend.healthy)
    await asyncio.sleep(DOWN_S)

    # back on the same address: the router's health watch sees SERVING, the next request is the probe
    await suite.replica("r-a", port=port)
    serving = time.monotonic()
    await until(lambda: backend.healthy, timeout=1.0)   # dialed again at once, not after gRPC's growing backoff
    call = router.Generate(chat("Are you back?", max_tokens=2), timeout=10)
    final = await call.read()
    routed = time.monotonic() - serving
    assert final.token_ids and routed < 1.0, f"its first chunk came {routed:.2f} s after it was SERVING"
    while (chunk := await call.read()) is not grpc.aio.EOF:
        final = chunk
    assert final.source.replica == "r-a" and final.usage.completion_tokens == 2
    assert backend.circuit.state == "closed" and backend.circuit.opened == 1
