"""gRPC server bootstrap shared by every service: health, reflection, the metrics side port, graceful
shutdown. (Server spans are opened by grpc_errors.map_errors.)"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.grpc_errors import tolerant
from services.common.metrics import ServiceMetrics
from services.common.tls import PLAINTEXT, TlsConfig

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 2**20


def _tolerant_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler is None or handler.request_deserializer is None:
        return handler
    return handler._replace(request_deserializer=tolerant(handler.request_deserializer))


class _TolerantGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}     # only methods it has: names come from callers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = _tolerant_handler(self._inner.service(handler_call_details))
            if handler is not None:
                self._handlers[method] = handler
        return handler


class _TolerantRegistry:
    """The server as a service's `register` sees it: its handlers are added with tolerant request
    deserializers (grpc_errors.tolerant), so bytes that do not parse (text that is not UTF-8, corrupt
    wire data) reach map_errors and become INVALID_ARGUMENT instead of gRPC's UNKNOWN."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_TolerantGenericHandler(h) for h in handlers])

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(service, {m: _tolerant_handler(h) for m, h in handlers.items()})


class GrpcServer:
    """An aio server with the standard health service and reflection.

    `start()` binds (port 0 picks a free port) and returns the bound port; `stop()` flips health to
    NOT_SERVING before stopping with a grace period, so load balancers drain first. With metrics, /metrics is served on
    `metrics_port` (0 = a free one, negative = none) from start() to stop(). `tls`: the port serves TLS
    (mutual TLS with a client CA) when it names a certificate, else plaintext."""

    def __init__(self, register: Callable[[grpc.aio.Server], None], service_names: Iterable[str],
                 host: str = "127.0.0.1", port: int = 0,
                 metrics: ServiceMetrics | None = None, metrics_port: int = -1, tls: TlsConfig = PLAINTEXT) -> None:
        self.service_names = list(service_names)
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        self.host, self.metrics, self.metrics_port, self.tls = host, metrics, metrics_port, tls
        register(_TolerantRegistry(self.server))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.address = f"{host}:{port}"
        self.port: int | None = None

    async def start(self) -> int:
        creds = self.tls.server_credentials()
        self.port = (self.server.add_secure_port(self.address, creds) if creds is not None
                     else self.server.add_insecure_port(self.address))
        if not self.port:
            raise OSError(f"cannot bind {self.address}")
        await self.server.start()
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(self.host, self.metrics_port) or -1
        for name in [*self.service_names, ""]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        for name in [*self.service_names, ""]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        if self.metrics is not None:
            self.metrics.close()

    async def serve_until_signal(self, grace: float = 5.0) -> None:
        """Block until SIGINT/SIGTERM, then stop gracefully.

        Everything built at startup (imported modules, torch, the model, compiled protos: a million
        objects in a service that loads torch) is moved out of the garbage collector's reach first, so a
        full collection no longer walks it on every ~70k allocations of request handling."""
        gc.collect()
        gc.freeze()
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        log.info("shutting down", extra={"grace_s": grace})
        await self.stop(grace)
