"""`strata serve router`: picks an inference replica per request (see services/router/service.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from grpc_health.v1 import health_pb2

from services.common import aio, models_file, telemetry
from services.common.aio import cancel_and_wait
from services.common.config import add_metrics_arg, env
from services.common.metrics import RouterMetrics, gauge
from services.common.logs import setup_logging
from services.common.server import GrpcServer
from services.common.tls import add_tls_args, tls_from_args
from services.router.backends import BackendConfig
from services.router.policy import POLICIES
from services.router.service import Router, RouterConfig

log = logging.getLogger(__name__)
_CIRCUIT = {"closed": 0, "half_open": 1, "open": 2}
SERVICE_NAME = "strata.v1.Router"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    d, b = RouterConfig(), BackendConfig()
    p.add_argument("--host", default=env("STRATA_ROUTER_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("STRATA_ROUTER_PORT", "50081")))
    add_metrics_arg(p, "ROUTER", 9081)
    p.add_argument("--backend", action="append", default=None,
                   help="inference replica host:port (repeat the flag; env STRATA_ROUTER_BACKENDS, comma-separated)")
    p.add_argument("--policy", choices=POLICIES, default=env("STRATA_ROUTER_POLICY", d.policy))
    p.add_argument("--max-attempts", type=int, default=d.max_attempts,
                   help="replicas tried per request before its first chunk")
    p.add_argument("--failure-threshold", type=int, default=b.failure_threshold,
                   help="failures within --failure-window-s that open a replica's circuit")
    p.add_argument("--failure-window-s", type=float, default=b.failure_window_s)
    p.add_argument("--open-cooldown-s", type=float, default=b.open_cooldown_s,
                   help="how long an open circuit skips its replica before one probe request")
    p.add_argument("--load-interval-s", type=float, default=b.load_interval_s, help="GetLoad polling period")
    p.add_argument("--discover", default=env("STRATA_REGISTRY_URL", ""), metavar="REDIS_URL",
                   help="also route to replicas registered in this Redis (inference --registry-url)")
    p.add_argument("--split", action="append", default=[], metavar="NAME=MODEL:WEIGHT,MODEL:WEIGHT",
                   help="A/B split: requests for NAME go to the models by weight (repeat for more names)")
    p.add_argument("--fallback", action="append", default=[], metavar="MODEL=OTHER[,OTHER]",
                   help="models to try, in order, when MODEL's replicas cannot start an answer")
    p.add_argument("--models-file", default=env("STRATA_MODELS_FILE", ""), metavar="FILE",
                   help="the suite's models file (TOML or YAML): its models' fallbacks (a --fallback for the same "
                        "model wins)")
    add_tls_args(p)


def parse_splits(items: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for item in items:
        try:
            name, rest = item.split("=", 1)
            out[name.strip()] = {m.strip(): float(w) for m, w in (part.rsplit(":", 1) for part in rest.split(","))}
        except ValueError:
            raise SystemExit(f"--split {item!r}: expected NAME=MODEL:WEIGHT,MODEL:WEIGHT") from None
    return out


def parse_fallbacks(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise SystemExit(f"--fallback {item!r}: expected MODEL=OTHER[,OTHER]")
        out[name.strip()] = [m.strip() for m in rest.split(",") if m.strip()]
    return out


def config_from_args(a: argparse.Namespace) -> RouterConfig:
    default = "" if a.discover else "127.0.0.1:50061"
    backends = a.backend or [x.strip() for x in env("STRATA_ROUTER_BACKENDS", default).split(",") if x.strip()]
    if a.max_attempts < 1 or a.failure_threshold < 1 or a.failure_window_s <= 0 or a.open_cooldown_s < 0 \
            or a.load_interval_s <= 0:
        raise SystemExit("--max-attempts and --failure-threshold must be >= 1; the intervals > 0")
    fallbacks: dict[str, list[str]] = {}
    if a.models_file:
        try:
            fallbacks = {m.name: list(m.fallbacks) for m in models_file.load(a.models_file).models if m.fallbacks}
        except models_file.ModelsFileError as exc:
            raise SystemExit(f"--models-file: {exc}") from None
    fallbacks.update(parse_fallbacks(a.fallback))
    return RouterConfig(backends=backends, policy=a.policy, max_attempts=a.max_attempts,
                        splits=parse_splits(a.split), fallbacks=fallbacks, discover_url=a.discover,
                        backend=BackendConfig(load_interval_s=a.load_interval_s, failure_threshold=a.failure_threshold,
                                              failure_window_s=a.failure_window_s, open_cooldown_s=a.open_cooldown_s,
                                              tls=tls_from_args(a)))


class RouterService:
    """Router + gRPC server; SERVING while at least one replica is healthy. Used by the CLI and the tests.
    config.backend.tls is both how it serves and how it dials the replicas."""

    def __init__(self, config: RouterConfig, host: str = "127.0.0.1", port: int = 0, metrics_port: int = -1) -> None:
        from services.common.pb import router_pb2_grpc
        from services.router.servicer import RouterServicer

        self.metrics, tracer = RouterMetrics(), telemetry.tracer("router")
        self.router = Router(config, tracer, self.metrics)
        self.metrics.collect_with(self._collect)
        servicer = RouterServicer(self.router)
        self.server = GrpcServer(lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s),
                                 [SERVICE_NAME], host, port, self.metrics, metrics_port, config.backend.tls)
        self._health_task: asyncio.Task | None = None
        self._stopped = False

    def _collect(self):
        backends = list(self.router.backends.values())

        def per(value) -> dict[tuple[str, ...], float]:
            return {(b.replica or b.address, b.address): float(value(b)) for b in backends}
        labels = ("replica", "address")
        yield gauge("strata:circuit_state", "Circuit breaker per replica: 0 closed, 1 half-open, 2 open",
                    per(lambda b: _CIRCUIT[b.circuit.state]), labels)
        yield gauge("strata:backend_healthy", "1 while the replica's health Watch says SERVING", per(lambda b: b.healthy), labels)
        yield gauge("strata:backend_pending_tokens", "The replica's pending tokens (GetLoad, plus what was sent since)",
                    per(lambda b: b.pending_tokens), labels)
        yield gauge("strata:backend_in_flight", "Requests this router has open on the replica", per(lambda b: b.in_flight), labels)

    async def start(self) -> int:
        port = await self.server.start()
        await self.router.start()
        self._health_task = asyncio.create_task(self._report_health(), name="router-health")
        return port

    async def _report_health(self) -> None:
        serving = None
        while True:
            ok = any(b.healthy for b in self.router.backends.values())
            if ok != serving:
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                await self.server.health.set(SERVICE_NAME, status)
                serving = ok
            await asyncio.sleep(0.2)

    async def stop(self, grace: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._health_task is not None:
            await cancel_and_wait([self._health_task])
        await self.server.stop(grace)
        await self.router.close()


async def serve(a: argparse.Namespace) -> None:
    service = RouterService(config_from_args(a), a.host, a.port, metrics_port=a.metrics_port)
    port = await service.start()
    aio.freeze_startup_heap()
    log.info("router ready", extra={"address": f"{a.host}:{port}", "policy": a.policy,
                                    "backends": list(service.router.backends)})
    try:
        await service.server.serve_until_signal()
    finally:
        await service.stop(0)


def run(args: argparse.Namespace) -> None:
    setup_logging("router")
    aio.run(serve(args))
