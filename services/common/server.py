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
from services.common.metrics import ServiceMetrics
from services.common.tls import PLAINTEXT, TlsConfig

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 2**20


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
        register(self.server)
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
