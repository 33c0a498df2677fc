"""`strata serve inference`: build the engine, start the gRPC server, serve until a signal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from dataclasses import dataclass

from services.common import aio, telemetry
from services.common.aio import cancel_and_wait
from services.common.config import add_metrics_arg, env
from services.common.metrics import InferenceMetrics, counter, gauge
from services.common.logs import setup_logging
from services.common.server import GrpcServer
from services.common.tls import PLAINTEXT, TlsConfig, add_tls_args, tls_from_args
from services.inference.config import EngineConfig, add_engine_args, engine_config_from_args
from services.inference.engine.async_engine import AsyncEngine
from services.inference.engine.engine import LLMEngine
from services.inference.engine.factory import build_engine

log = logging.getLogger(__name__)
SERVICE_NAME = "strata.v1.Inference"


@dataclass(slots=True, frozen=True)
class InferenceServiceConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 50061
    replica_id: str = ""
    max_queued_requests: int | None = 512   # in-flight requests before RESOURCE_EXHAUSTED
    registry_url: str = ""                  # Redis to register in, so routers discover this replica
    advertise: str = ""                     # the address routers should use (default host:port)
    grace_s: float = 5.0
    metrics_port: int = -1                  # Prometheus /metrics side port (0 = free, -1 = none)
    tls: TlsConfig = PLAINTEXT              # the gRPC port's TLS (mutual with a client CA)
    stream_interval: int = 1                # tokens a stream message carries (servicer.py: the first and the last go at once)

    def __post_init__(self) -> None:
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--host", default=env("STRATA_INFERENCE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("STRATA_INFERENCE_PORT", "50061") or 50061))
    add_metrics_arg(p, "INFERENCE", 9061)
    p.add_argument("--replica-id", default=env("STRATA_REPLICA_ID", ""))
    p.add_argument("--max-queued-requests", type=int, default=512)
    p.add_argument("--registry-url", default=env("STRATA_REGISTRY_URL", ""),
                   help="Redis URL: register this replica there (heartbeats) for routers started with --discover")
    p.add_argument("--advertise", default=env("STRATA_ADVERTISE_ADDRESS", ""),
                   help="host:port routers should dial (default: --host:--port)")
    p.add_argument("--stream-interval", type=_positive_int, default=env("STRATA_STREAM_INTERVAL", "1"),
                   help="tokens per stream message (as vLLM's --stream-interval): 1 sends each token as it is "
                        "made; N holds them until N are ready (the first token and the answer's end go at once), "
                        "so the replica, the router, the gateway and the caller each handle ~N times fewer "
                        "messages (less CPU per token where they share a few cores) at the cost of burstier "
                        "streaming (default 1; env STRATA_STREAM_INTERVAL)")
    add_tls_args(p)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def config_from_args(a: argparse.Namespace) -> InferenceServiceConfig:
    return InferenceServiceConfig(engine=engine_config_from_args(a), host=a.host, port=a.port,
                                  replica_id=a.replica_id or f"{socket.gethostname()}-{os.getpid()}",
                                  max_queued_requests=a.max_queued_requests, registry_url=a.registry_url,
                                  advertise=a.advertise, metrics_port=a.metrics_port, tls=tls_from_args(a),
                                  stream_interval=a.stream_interval)


class InferenceService:
    """Engine + gRPC server; used by the CLI and by integration tests (port 0)."""

    def __init__(self, config: InferenceServiceConfig, engine: LLMEngine | None = None) -> None:
        from services.common.pb import inference_pb2_grpc
        from services.inference.servicer import InferenceServicer

        self.config = config
        # built on the engine thread (async_engine.py says why); a device fault kills the engine: stop the
        # service (SIGTERM: graceful), its supervisor restarts it
        self.engine = AsyncEngine(engine or (lambda: build_engine(config.engine)), config.max_queued_requests,
                                  on_fatal=lambda: os.kill(os.getpid(), signal.SIGTERM))
        self.llm = self.engine.engine
        self.metrics, tracer = InferenceMetrics(), telemetry.tracer("inference")
        self.metrics.collect_with(self._collect)
        servicer = InferenceServicer(self.engine, config.replica_id or "inference-0", tracer, self.metrics,
                                     stream_interval=config.stream_interval)
        self.server = GrpcServer(lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, s),
                                 [SERVICE_NAME], config.host, config.port, self.metrics, config.metrics_port,
                                 config.tls)
        self._register: asyncio.Task | None = None
        self._redis = None

    def _collect(self):
        s = self.engine.stats
        yield gauge("strata:num_requests_running", "Requests in the running batch", s.num_running)
        yield gauge("strata:num_requests_waiting", "Requests waiting to be scheduled", s.num_waiting)
        yield gauge("strata:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1)", s.kv_cache_usage)
        yield gauge("strata:num_pending_tokens", "Prompt and output tokens still to compute", s.num_pending_tokens)
        yield counter("strata:prompt_tokens", "Prompt tokens processed", s.prompt_tokens_total)
        yield counter("strata:generation_tokens", "Tokens generated", s.generation_tokens_total)
        yield counter("strata:prefix_cache_hits", "Prompt tokens served from the prefix cache", s.prefix_cache_hit_tokens_total)
        yield counter("strata:num_preemptions", "Requests preempted for KV space", s.num_preemptions_total)
        yield counter("strata:spec_decode_num_drafts", "Verification runs that carried proposals", s.spec_drafts_total)
        yield counter("strata:spec_decode_num_draft_tokens", "Proposed tokens verified", s.spec_draft_tokens_total)
        yield counter("strata:spec_decode_num_accepted_tokens", "Proposed tokens accepted", s.spec_accepted_tokens_total)
        yield counter("strata:spec_decode_num_accepted_tokens_per_pos", "Runs whose proposal at this position was accepted",
                      {(str(i),): n for i, n in enumerate(s.spec_accepted_by_position)}, ("position",))
        yield gauge("strata:spec_decode_acceptance_rate", "Accepted / proposed tokens since start", s.spec_acceptance_rate)
        yield gauge("strata:spec_decode_mean_tokens_per_step", "Tokens a request gets per verification step (1 = none)",
                    s.spec_mean_tokens_per_step)
        yield counter("strata:model_steps", "Model steps by compute path (layer_stack, row_kernels, torch)",
                      {(path,): n for path, n in s.steps_by_path}, ("path",))

    async def start(self) -> int:
        self.engine.start()
        port = await self.server.start()
        if self.config.registry_url:
            from services.common import redis_client
            from services.common.registry import Registry
            self._redis = redis_client.connect(self.config.registry_url, socket_timeout=1.0, socket_connect_timeout=1.0)
            address = self.config.advertise or f"{self.config.host}:{port}"
            self._register = asyncio.create_task(Registry(self._redis).keep_registered(address), name="registry")
        return port

    async def deregister(self) -> None:
        if self._register is not None:
            await cancel_and_wait([self._register])
            await self._redis.aclose()
            self._register = None

    async def stop(self) -> None:
        await self.deregister()                 # first: routers stop sending new requests
        await self.server.stop(self.config.grace_s)
        self.engine.shutdown()


async def serve(config: InferenceServiceConfig) -> None:
    service = InferenceService(config)
    port = await service.start()
    aio.freeze_startup_heap()               # the model and the engine: a full collection stalled a decode step
    log.info("inference service ready", extra={"address": f"{config.host}:{port}",
                                                "replica": config.replica_id, "dtype": config.engine.model.dtype})
    try:
        await service.server.serve_until_signal(config.grace_s)
    finally:
        await service.deregister()
        service.engine.shutdown()


def run(args: argparse.Namespace) -> None:
    setup_logging("inference")
    aio.run(serve(config_from_args(args)))
