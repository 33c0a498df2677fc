"""The gateway's downstream for integration tests: a real inference replica, router and semantic cache,
each a gRPC server on port 0 in this process (shared by the gateway, client and observability tests)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import AsyncIterator

from services.cache.main import CacheService
from services.cache.service import CacheConfig
from services.inference.config import engine_config
from services.inference.main import InferenceService, InferenceServiceConfig
from services.router.backends import BackendConfig
from services.router.main import RouterService
from services.router.service import RouterConfig


@dataclass
class Downstream:
    replica: InferenceService
    router: RouterService
    cache: CacheService
    router_address: str
    cache_address: str


@contextlib.asynccontextmanager
async def running_downstream(redis_url: str, engine, embedder, replica_id: str = "r-1",
                             metrics_port: int = -1) -> AsyncIterator[Downstream]:
    """Started, with the router seeing its replica healthy; stopped on exit (metrics_port 0: side ports)."""
    replica = InferenceService(InferenceServiceConfig(engine=engine_config(dtype="float32"), port=0, replica_id=replica_id,
                                                      grace_s=0.0, metrics_port=metrics_port), engine=engine)
    rport = await replica.start()
    router = RouterService(RouterConfig(backends=[f"127.0.0.1:{rport}"], backend=BackendConfig(load_interval_s=0.1)),
                           metrics_port=metrics_port)
    router_port = await router.start()
    cache = CacheService(CacheConfig(redis_url=redis_url), port=0, embedder=embedder, metrics_port=metrics_port)
    cache_port = await cache.start()
    try:
        for _ in range(200):
            if all(b.healthy for b in router.router.backends.values()):
                break
            await asyncio.sleep(0.02)
        yield Downstream(replica, router, cache, f"127.0.0.1:{router_port}", f"127.0.0.1:{cache_port}")
    finally:
        await cache.stop(0)
        await router.stop(0)
        await replica.stop()
