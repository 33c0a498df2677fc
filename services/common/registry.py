"""Replica registration in Redis: inference replicas heartbeat their address, routers discover them.

One sorted set `strata:registry:inference`: address -> heartbeat expiry (ms). A replica that stops
deregisters; one that dies simply stops heartbeating and drops out after its TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
KEY = "strata:registry:inference"


class Registry:
    def __init__(self, redis: aioredis.Redis, key: str = KEY) -> None:
        self.redis = redis
        self.key = key

    async def heartbeat(self, address: str, ttl_s: float) -> None:
        await self.redis.zadd(self.key, {address: int((time.time() + ttl_s) * 1000)})

    async def remove(self, address: str) -> None:
        await self.redis.zrem(self.key, address)

    async def alive(self) -> list[str]:
        now = int(time.time() * 1000)
        await self.redis.zremrangebyscore(self.key, "-inf", now)
        return sorted(a.decode() for a in await self.redis.zrange(self.key, 0, -1))

    async def keep_registered(self, address: str, ttl_s: float = 6.0) -> None:
        """Heartbeat every ttl/3 until cancelled; then deregister (best effort). Redis outages are logged
        and ridden out: the replica keeps serving the routers that already know it."""
        try:
            while True:
                try:
                    await self.heartbeat(address, ttl_s)
                except (RedisError, OSError):
                    log.warning("registry heartbeat failed", extra={"address": address})
                await asyncio.sleep(ttl_s / 3)
        finally:
            try:
                await asyncio.wait_for(self.remove(address), 1.0)
            except (RedisError, OSError, asyncio.TimeoutError):
                pass
