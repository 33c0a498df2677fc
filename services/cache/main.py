"""`strata serve cache`: the semantic cache over Redis as a gRPC service."""

from __future__ import annotations

import argparse
import logging
import os
import socket

from grpc_health.v1 import health_pb2

from services.cache.service import CacheConfig, SemanticCacheService
from services.common import aio, telemetry
from services.common.config import add_metrics_arg, env
from services.common.metrics import CacheMetrics, counter, gauge
from services.common.logs import setup_logging
from services.common.server import GrpcServer
from services.common.tls import PLAINTEXT, TlsConfig, add_tls_args, tls_from_args

log = logging.getLogger(__name__)
SERVICE_NAME = "strata.v1.SemanticCache"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    d = CacheConfig()
    p.add_argument("--host", default=env("STRATA_CACHE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("STRATA_CACHE_PORT", "50071")))
    add_metrics_arg(p, "CACHE", 9071)
    p.add_argument("--redis-url", default=env("REDIS_URL", d.redis_url))
    p.add_argument("--key-prefix", default=env("STRATA_CACHE_KEY_PREFIX", d.key_prefix))
    p.add_argument("--ttl", type=int, default=int(env("STRATA_CACHE_TTL_S", str(d.default_ttl_s))),
                   help="default entry TTL in seconds (0 = no expiry)")
    p.add_argument("--no-refresh-ttl", action="store_true", help="do not restart an entry's TTL when it is hit")
    p.add_argument("--max-entries", type=int, default=int(env("STRATA_CACHE_MAX_ENTRIES", str(d.max_entries_per_namespace))),
                   help="size cap per namespace; the least recently hit entries are evicted (0 = no cap)")
    p.add_argument("--similarity-threshold", type=float, default=None,
                   help="decide semantic hits by plain cosine >= this instead of the calibrated classifier")
    p.add_argument("--hit-threshold", type=float, default=None,
                   help="the classifier's hit probability (default: the one it was trained with, 0.80); lower serves "
                        "more paraphrases and more wrong answers (the curve: README, How good the hit decision is)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="semantic candidates the decision considers")
    p.add_argument("--ann-min-rows", type=int, default=int(env("STRATA_CACHE_ANN_MIN_ROWS", str(d.ann_min_rows))),
                   help="entries of one namespace and context from which search walks an HNSW graph (usearch) and "
                        "re-scores its proposals exactly; below it search is exact, and faster")
    workers, threads = default_embed_parallelism()
    p.add_argument("--embed-workers", type=int, default=int(env("STRATA_CACHE_EMBED_WORKERS", str(workers))),
                   help="embedding batches run at once, one thread each (default: 2 on 2+ cores)")
    p.add_argument("--embed-threads", type=int, default=int(env("STRATA_CACHE_EMBED_THREADS", str(threads))),
                   help="torch threads per embedding batch (default: the cores divided among the workers)")
    add_tls_args(p)


def default_embed_parallelism() -> tuple[int, int]:
    """(workers, threads each): two single-threaded forwards beat one two-threaded forward on a small machine
    (measured on 2 cores, bench/results/cache.json), as the event loop then stalls one batch, not both."""
    cores = len(os.sched_getaffinity(0))
    workers = 2 if cores >= 2 else 1
    return workers, max(1, cores // workers)


def config_from_args(a: argparse.Namespace) -> CacheConfig:
    if a.ttl < 0 or a.max_entries < 0 or a.top_k < 1 or a.embed_workers < 1 or a.embed_threads < 1 or a.ann_min_rows < 1:
        raise SystemExit("--ttl and --max-entries must be >= 0, --top-k, --embed-workers, --embed-threads and "
                         "--ann-min-rows >= 1")
    if a.similarity_threshold is not None and not 0 < a.similarity_threshold <= 1:
        raise SystemExit("--similarity-threshold must be in (0, 1]")
    if a.hit_threshold is not None and not 0 < a.hit_threshold < 1:
        raise SystemExit("--hit-threshold must be in (0, 1)")
    return CacheConfig(redis_url=a.redis_url, key_prefix=a.key_prefix, default_ttl_s=a.ttl,
                       refresh_ttl_on_hit=not a.no_refresh_ttl, max_entries_per_namespace=a.max_entries,
                       similarity_threshold=a.similarity_threshold, hit_threshold=a.hit_threshold, top_k=a.top_k,
                       ann_min_rows=a.ann_min_rows, embed_workers=a.embed_workers)


class CacheService:
    """Embedder + SemanticCacheService + gRPC server; used by the CLI and the tests (port 0)."""

    def __init__(self, config: CacheConfig, host: str = "127.0.0.1", port: int = 0, embedder=None,
                 replica_id: str = "", embed_threads: int | None = None, metrics_port: int = -1,
                 tls: TlsConfig = PLAINTEXT) -> None:
        from services.cache.servicer import SemanticCacheServicer
        from services.common.pb import cache_pb2_grpc
        from services.embedding.embedder import MiniLMEmbedder

        self.embedder = embedder or MiniLMEmbedder(num_threads=embed_threads)
        self.cache = SemanticCacheService(config, self.embedder, replica_id=replica_id)
        self.metrics, tracer = CacheMetrics(), telemetry.tracer("cache")
        self.metrics.collect_with(self._collect)
        servicer = SemanticCacheServicer(self.cache, tracer, self.metrics)
        self.server = GrpcServer(lambda s: cache_pb2_grpc.add_SemanticCacheServicer_to_server(servicer, s),
                                 [SERVICE_NAME], host, port, self.metrics, metrics_port, tls)
        self.cache.on_health_change(self._health_changed)
        self._stopped = False

    def _collect(self):
        c, cache = self.cache.counters, self.cache
        yield counter("strata:cache_lookups", "Lookups answered", c.lookups)
        yield counter("strata:cache_hits", "Hits by layer", {("exact",): c.hits_exact, ("semantic",): c.hits_semantic},
                      ("layer",))
        yield counter("strata:cache_misses", "Lookups that missed", c.misses)
        yield counter("strata:cache_stores", "Answers stored", c.stores)
        yield counter("strata:cache_evictions", "Entries evicted at the size cap", c.evictions)
        yield counter("strata:cache_embedded_texts", "Texts embedded for Embed callers", c.embedded)
        yield gauge("strata:cache_index_entries", "Entries in this replica's similarity index",
                    sum(len(i) for i in cache.indexes.values()))
        yield gauge("strata:cache_redis_up", "1 when Redis is reachable", float(cache.redis_ok))

    async def _health_changed(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.server.health.set(SERVICE_NAME, status)

    async def start(self) -> int:
        port = await self.server.start()
        await self.cache.start()
        await self._health_changed(self.cache.redis_ok)
        return port

    async def stop(self, grace: float = 2.0) -> None:
        """Idempotent: a second call returns at once."""
        if self._stopped:
            return
        self._stopped = True
        await self.server.stop(grace)
        await self.cache.close()


async def serve(a: argparse.Namespace) -> None:
    service = CacheService(config_from_args(a), a.host, a.port, replica_id=f"{socket.gethostname()}-{os.getpid()}",
                           embed_threads=a.embed_threads, metrics_port=a.metrics_port, tls=tls_from_args(a))
    port = await service.start()
    aio.freeze_startup_heap()               # torch, the embedder and the rebuilt index (bench/cache_scale.py)
    log.info("cache service ready", extra={"address": f"{a.host}:{port}", "decision": service.cache.decider.describe(),
                                           "redis_ok": service.cache.redis_ok})
    try:
        await service.server.serve_until_signal()
    finally:
        await service.stop(0)


def run(args: argparse.Namespace) -> None:
    setup_logging("cache")
    aio.run(serve(args))
