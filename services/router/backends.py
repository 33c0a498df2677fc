"""Inference replicas as the router sees them: a channel each, health from grpc.health.v1 Watch, load
from the replica's GetLoad, a circuit breaker, and this router's own in-flight accounting."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.aio import cancel_and_wait
from services.common.pb import inference_pb2, inference_pb2_grpc
from services.common.tls import PLAINTEXT, TlsConfig
from services.router.circuit import CircuitBreaker

log = logging.getLogger(__name__)
INFERENCE_SERVICE = "strata.v1.Inference"


@dataclass(frozen=True, slots=True)
class BackendConfig:
    load_interval_s: float = 0.5
    load_timeout_s: float = 1.0
    reconnect_s: float = 0.5
    failure_threshold: int = 5
    failure_window_s: float = 30.0
    open_cooldown_s: float = 10.0
    tls: TlsConfig = PLAINTEXT         # how the replicas are dialed (and the router's own port served)


class Backend:
    def __init__(self, address: str, config: BackendConfig) -> None:
        self.address = address
        self.config = config
        # a replica that comes back is dialed within reconnect_s, not after gRPC's backoff (which grows to 2 min)
        backoff_ms = max(1, round(config.reconnect_s * 1000))
        self.channel = config.tls.channel(address, [("grpc.initial_reconnect_backoff_ms", backoff_ms),
                                                    ("grpc.max_reconnect_backoff_ms", backoff_ms)])
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.circuit = CircuitBreaker(config.failure_threshold, config.failure_window_s, config.open_cooldown_s)
        self.healthy = False
        self.load = inference_pb2.Load()
        self.replica = ""
        self.model: str | None = None   # the model it serves (GetModelInfo), once known
        self.chat = False               # that model has a chat template (GetModelInfo)
        self.in_flight = 0
        self.sent_tokens = 0        # estimated tokens routed here since the last load report
        self.routed = 0
        self.failures = 0
        self._tasks: list[asyncio.Task] = []

    @property
    def pending_tokens(self) -> int:
        return int(self.load.pending_tokens) + self.sent_tokens

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch_health(), name=f"router-health-{self.address}"),
                       asyncio.create_task(self._poll_load(), name=f"router-load-{self.address}")]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        await self.channel.close()

    async def _watch_health(self) -> None:
        while True:
            try:
                async for r in self.health.Watch(health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE)):
                    serving = r.status == health_pb2.HealthCheckResponse.SERVING
                    if serving:   # (re)learn the served model: a restart may bring another one
                        info = await self.stub.GetModelInfo(inference_pb2.GetModelInfoRequest(),
                                                            timeout=self.config.load_timeout_s)
                        self.model, self.chat = info.model, info.chat
                    self._set_healthy(serving)
            except grpc.aio.AioRpcError:
                pass
            self._set_healthy(False)          # the watch ended: the replica is gone or restarting
            await asyncio.sleep(self.config.reconnect_s)

    def _set_healthy(self, ok: bool) -> None:
        if ok != self.healthy:
            log.info("replica %s", "healthy" if ok else "unhealthy", extra={"backend": self.address})
            if ok:                            # back: an open circuit probes with the next request
                self.circuit.health_restored()
        self.healthy = ok

    async def _poll_load(self) -> None:
        while True:
            try:
                self.load = await self.stub.GetLoad(inference_pb2.GetLoadRequest(),
                                                    timeout=self.config.load_timeout_s)
                self.replica = self.load.replica or self.replica
                self.sent_tokens = 0          # the report now includes what was sent before it
            except grpc.aio.AioRpcError:
                pass                          # health says whether it is up; keep the last figures
            await asyncio.sleep(self.config.load_interval_s)
