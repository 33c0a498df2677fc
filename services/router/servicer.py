"""gRPC face of the router: translates between protobuf and `Router`."""

from __future__ import annotations

import grpc

from services.common.grpc_errors import map_errors
from services.common.pb import router_pb2, router_pb2_grpc
from services.router.circuit import CLOSED, HALF_OPEN, OPEN
from services.router.service import Router

_CIRCUIT = {CLOSED: router_pb2.CIRCUIT_STATE_CLOSED, OPEN: router_pb2.CIRCUIT_STATE_OPEN,
            HALF_OPEN: router_pb2.CIRCUIT_STATE_HALF_OPEN}


class RouterServicer(router_pb2_grpc.RouterServicer):
    SERVICE = "strata.v1.Router"
    UNTRACED = frozenset({"ListBackends"})      # polled by every gateway (its model directory)

    def __init__(self, router: Router) -> None:
        self.tracer = router.tracer
        self.router = router

    @map_errors
    async def Generate(self, request, context: grpc.aio.ServicerContext):
        async for chunk in self.router.generate(request, context.time_remaining()):
            yield chunk

    @map_errors
    async def ListBackends(self, request, context: grpc.aio.ServicerContext):
        return router_pb2.ListBackendsResponse(policy=self.router.picker.policy, backends=[
            router_pb2.Backend(address=b.address, replica=b.replica, healthy=b.healthy, circuit=_CIRCUIT[b.circuit.state],
                               load=b.load, in_flight=b.in_flight, routed=b.routed, failures=b.failures,
                               model=b.model or "", chat=b.chat)
            for b in self.router.backends.values()])
