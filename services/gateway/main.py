"""`strata serve gateway`: API keys, limits, guardrails, cache and usage in front of the router."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass


from services.common import aio, models_file, telemetry
from services.common.config import add_metrics_arg, env
from services.common.metrics import GatewayMetrics, gauge
from services.common.logs import setup_logging
from services.common.server import GrpcServer
from services.common.tls import PLAINTEXT, TlsConfig, add_tls_args, tls_from_args
from services.common import redis_client
from services.gateway.admin import GatewayAdmin
from services.gateway.budgets import TenantBudgets
from services.gateway.clients import Downstream
from services.gateway.config import INJECTION_MODES, PII_MODES, GatewayConfig, ModelPrice
from services.gateway.directory import ModelDirectory
from services.gateway.jobs import JobsConfig
from services.gateway.jobs.store import JobStore
from services.gateway.keys import KeyStore
from services.gateway.limits import RateLimiter
from services.gateway.service import Gateway
from services.gateway.usage import UsageStore

log = logging.getLogger(__name__)
SERVICE_NAMES = ["strata.v1.Gateway", "strata.v1.GatewayAdmin"]


@dataclass(frozen=True, slots=True)
class GatewayServiceConfig:
    gateway: GatewayConfig
    redis_url: str
    router_address: str
    cache_address: str = ""
    key_pepper: str = ""
    admin_token: str = ""
    redis_timeout_s: float = 0.5
    tls: TlsConfig = PLAINTEXT      # the public port (and the channels to the router and cache)
    jobs: JobsConfig = JobsConfig()


def add_serve_args(p: argparse.ArgumentParser) -> None:
    d = GatewayConfig()
    p.add_argument("--host", default=env("STRATA_GATEWAY_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("STRATA_GATEWAY_PORT", "50051")))
    add_metrics_arg(p, "GATEWAY", 9051)
    p.add_argument("--http-port", type=int, default=int(env("STRATA_GATEWAY_HTTP_PORT", "8000") or 8000),
                   help="the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, "
                        "/healthz, /readyz): 0 = a free port, -1 = off (default 8000; HTTPS with the gRPC port's "
                        "TLS settings; env STRATA_GATEWAY_HTTP_PORT)")
    p.add_argument("--redis-url", default=env("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--router", default=env("STRATA_ROUTER_ADDRESS", "127.0.0.1:50081"), help="router host:port")
    p.add_argument("--cache", default=env("STRATA_CACHE_ADDRESS", "127.0.0.1:50071"),
                   help="semantic cache host:port ('' = no cache)")
    p.add_argument("--models-file", default=env("STRATA_MODELS_FILE", ""), metavar="FILE",
                   help="models, prices, tiers, auto rules, splits and cascades (TOML or YAML; deploy/models.toml)")
    p.add_argument("--models", default=env("STRATA_GATEWAY_MODELS", ""),
                   help='without --models-file: JSON {"model": [usd per 1k prompt tokens, usd per 1k completion tokens]}')
    p.add_argument("--pii", choices=PII_MODES, default=env("STRATA_GATEWAY_PII", d.pii_mode))
    p.add_argument("--redact-responses", action="store_true")
    p.add_argument("--injection", choices=INJECTION_MODES, default=env("STRATA_GATEWAY_INJECTION", d.injection_mode))
    p.add_argument("--injection-similarity", type=float,
                   default=float(env("STRATA_GATEWAY_INJECTION_SIMILARITY", str(d.injection_similarity))),
                   help="embedding cosine to a known attack phrasing that counts as injection (0 = rules only)")
    p.add_argument("--limits-fail", choices=["open", "closed"], default=env("STRATA_GATEWAY_LIMITS_FAIL", "open"),
                   help="when Redis is unreachable: admit without limits (open) or refuse (closed)")
    p.add_argument("--auth-failures-per-minute", type=int,
                   default=int(env("STRATA_GATEWAY_AUTH_FAILURES_PER_MINUTE", str(d.auth_failures_per_minute))),
                   help="failed API key attempts a client address may make per minute before it is refused (0 = no limit)")
    p.add_argument("--max-in-flight", type=int, default=int(env("STRATA_GATEWAY_MAX_IN_FLIGHT", str(d.max_in_flight))),
                   help="requests this gateway carries at once; more are refused at once with RESOURCE_EXHAUSTED "
                        "and retry-after (0 = no cap)")
    j = JobsConfig()
    p.add_argument("--job-workers", type=int, default=int(env("STRATA_GATEWAY_JOB_WORKERS", str(j.workers))),
                   help="background job items this gateway runs at once, after every interactive request (0 = none: "
                        "it still takes and answers job calls; env STRATA_GATEWAY_JOB_WORKERS)")
    p.add_argument("--job-max-attempts", type=int, default=j.max_attempts,
                   help="runs of a job item that fails transiently before it is given up (dead-lettered)")
    p.add_argument("--job-claim-idle-s", type=float, default=j.claim_idle_s,
                   help="an item held this long by a worker that stopped (it renews its items every third of it) is "
                        "run by another")
    p.add_argument("--job-retention-s", type=float, default=j.retention_s,
                   help="a job's requests and results are kept this long after it ends (default 7 days)")
    p.add_argument("--webhook-allow-private", action="store_true",
                   default=env("STRATA_GATEWAY_WEBHOOK_ALLOW_PRIVATE", "") in ("1", "true"),
                   help="send job webhooks to private, loopback and link-local addresses too (off by default: a "
                        "tenant's webhook URL must not reach into the gateway's network; env "
                        "STRATA_GATEWAY_WEBHOOK_ALLOW_PRIVATE=1)")
    add_tls_args(p)
    p.add_argument("--plaintext", action="store_true", default=env("STRATA_GATEWAY_PLAINTEXT", "") in ("1", "true"),
                   help="serve the public port without TLS (local runs only; env STRATA_GATEWAY_PLAINTEXT=1)")


def config_from_args(a: argparse.Namespace) -> GatewayServiceConfig:
    pepper, admin = env("STRATA_KEY_PEPPER", ""), env("STRATA_ADMIN_TOKEN", "")
    if len(pepper) < 16:
        raise SystemExit("set STRATA_KEY_PEPPER (a secret of 16+ characters) for the API key hashes")
    models = GatewayConfig().models
    if a.models and a.models_file:
        raise SystemExit("--models and --models-file: give one (the file has the prices)")
    if a.models:
        try:
            models = {k: ModelPrice(float(v[0]), float(v[1])) for k, v in json.loads(a.models).items()}
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            raise SystemExit(f"--models: {exc}") from None
    tls = tls_from_args(a)
    if not tls.serves_tls and not a.plaintext:
        raise SystemExit("the gateway's public port serves TLS: give --tls-cert and --tls-key (STRATA_TLS_CERT, "
                         "STRATA_TLS_KEY), or --plaintext (STRATA_GATEWAY_PLAINTEXT=1) for a local run")
    settings = dict(pii_mode=a.pii, redact_responses=a.redact_responses, injection_mode=a.injection,
                    injection_similarity=a.injection_similarity, limits_fail_open=a.limits_fail == "open",
                    auth_failures_per_minute=a.auth_failures_per_minute, max_in_flight=a.max_in_flight)
    try:
        if a.models_file:
            gateway = GatewayConfig.from_models_file(models_file.load(a.models_file), **settings)
        else:
            gateway = GatewayConfig(models=models, **settings)
    except ValueError as exc:
        raise SystemExit(f"gateway: {exc}") from None
    if a.job_workers < 0 or a.job_max_attempts < 1 or a.job_claim_idle_s <= 0 or a.job_retention_s <= 0:
        raise SystemExit("--job-workers must be >= 0, --job-max-attempts >= 1, --job-claim-idle-s and "
                         "--job-retention-s > 0")
    jobs = JobsConfig(workers=a.job_workers, max_attempts=a.job_max_attempts, claim_idle_s=a.job_claim_idle_s,
                      retention_s=a.job_retention_s, webhook_private=a.webhook_allow_private)
    return GatewayServiceConfig(
        gateway, redis_url=a.redis_url, router_address=a.router, cache_address=a.cache, key_pepper=pepper, admin_token=admin,
        tls=tls, jobs=jobs)


class GatewayService:
    """Gateway + gRPC server; used by the CLI and the tests (port 0)."""

    def __init__(self, config: GatewayServiceConfig, host: str = "127.0.0.1", port: int = 0, embedder=None,
                 metrics_port: int = -1, http_port: int = -1) -> None:
        """http_port: the OpenAI-compatible HTTP face's port (0 = a free one, -1 = none)."""
        from services.common.pb import gateway_pb2_grpc
        from services.gateway.servicer import GatewayAdminServicer, GatewayServicer

        self.redis = redis_client.connect(config.redis_url, socket_timeout=config.redis_timeout_s,
                                       socket_connect_timeout=config.redis_timeout_s)
        self.down = Downstream(config.router_address, config.cache_address, tls=config.tls)
        self.batcher, similarity = None, None
        g = config.gateway
        if g.injection_mode != "allow" and g.injection_similarity > 0:
            from services.embedding.batcher import MicroBatcher
            from services.embedding.embedder import MiniLMEmbedder
            from services.gateway.guardrails import InjectionSimilarity

            embedder = embedder or MiniLMEmbedder(num_threads=1)
            self.batcher = MicroBatcher(embedder.embed, max_batch=32, max_wait_ms=1.0)
            similarity = InjectionSimilarity(embedder.embed, self.batcher.embed, g.injection_similarity)
        self.metrics, tracer = GatewayMetrics(), telemetry.tracer("gateway")
        # on a Redis Cluster every key of the gateway, its jobs' included, shares one hash slot (redis_client.keyspace):
        # the jobs' commit writes usage, the key changes write the audit log, in one script or transaction
        gw = redis_client.keyspace(self.redis, "strata:gw:")
        keys, self.usage = KeyStore(self.redis, config.key_pepper, gw), UsageStore(self.redis, gw)
        self.directory = ModelDirectory(self.down.replicas)
        tenants = TenantBudgets(self.redis, gw)
        self.gateway = Gateway(g, keys, RateLimiter(self.redis, gw), self.usage, self.down, similarity, tracer, self.metrics,
                               self.directory, tenants)
        self.admin = GatewayAdmin(g, keys, self.usage, self.gateway.authenticator, self.directory, tenants)
        self.jobs = JobStore(self.redis, config.jobs, usage_prefix=gw)
        self.worker = None
        if config.jobs.workers > 0:
            from services.gateway.jobs.worker import JobWorker

            self.worker = JobWorker(self.jobs, self.gateway, keys, config.jobs, self.metrics)
        servicer = GatewayServicer(self.gateway, self.jobs)
        admin = GatewayAdminServicer(self.admin, config.admin_token, tracer)
        self.metrics.collect_with(lambda: [gauge("strata:gateway_in_flight", "Requests this gateway is carrying now",
                                                 self.gateway.in_flight)])

        def register(server) -> None:
            gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
            gateway_pb2_grpc.add_GatewayAdminServicer_to_server(admin, server)
        self.server = GrpcServer(register, SERVICE_NAMES, host, port, self.metrics, metrics_port, config.tls)
        self.http = None
        self.http_port = -1
        if http_port >= 0:
            from services.gateway.http import HttpFrontDoor, HttpServer

            from services.gateway.http_batches import BatchRoutes

            door = HttpFrontDoor(self.gateway, ready=lambda: self.directory.known,
                                 extra_routes=BatchRoutes(self.gateway, self.jobs).routes())
            self.http = HttpServer(door, host, http_port, config.tls)
        self._stopped = False

    async def start(self) -> int:
        port = await self.server.start()
        self.directory.start()
        if self.worker is not None:
            self.worker.start()
        if self.http is not None:
            self.http_port = await self.http.start()
        return port

    async def stop(self, grace: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.http is not None:
            await self.http.stop()
        if self.worker is not None:               # running items get the grace; the rest stay queued for others
            await self.worker.stop(grace)
        await self.server.stop(grace)
        await self.gateway.close()
        await self.usage.close()
        if self.batcher is not None:
            await self.batcher.close()
        await self.down.close()
        await self.redis.aclose()


async def serve(a: argparse.Namespace) -> None:
    service = GatewayService(config_from_args(a), a.host, a.port, metrics_port=a.metrics_port, http_port=a.http_port)
    port = await service.start()
    aio.freeze_startup_heap()
    log.info("gateway ready", extra={"address": f"{a.host}:{port}", "router": a.router, "cache": a.cache,
                                     "http": f"{a.host}:{service.http_port}" if service.http_port >= 0 else "off",
                                     "tls": "mutual" if service.server.tls.client_ca_file else
                                     "on" if service.server.tls.serves_tls else "off (--plaintext)"})
    try:
        await service.server.serve_until_signal()
    finally:
        await service.stop(0)


def run(args: argparse.Namespace) -> None:
    setup_logging("gateway")
    aio.run(serve(args))
