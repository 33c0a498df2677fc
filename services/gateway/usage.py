"""Usage per key and UTC day in Redis (requests, tokens, spend, cache hits) and the running total spend
that budgets are checked against. Spend is kept in micro-dollars so counters stay integers.

Keys (prefix `strata:gw:`): usage:{key}:{YYYY-MM-DD} hash, usage:{key}:total hash (spend_micro).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import redis.asyncio as aioredis

USAGE_TTL_S = 400 * 86_400      # a little over a year of daily records


def utc_day(ts: float | None = None) -> str:
    when = dt.datetime.now(dt.timezone.utc) if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    return when.strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class DayUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spend_usd: float = 0.0
    cache_hits: int = 0


class UsageStore:
    def __init__(self, redis: aioredis.Redis, prefix: str = "strata:gw:") -> None:
        self.redis = redis
        self.prefix = prefix

    async def record(self, key_id: str, prompt_tokens: int, completion_tokens: int, spend_usd: float,
                     cache_hit: bool, day: str | None = None) -> None:
        day_key = f"{self.prefix}usage:{key_id}:{day or utc_day()}"
        micro = round(spend_usd * 1e6)
        async with self.redis.pipeline(transaction=True) as p:
            p.hincrby(day_key, "requests", 1)
            p.hincrby(day_key, "prompt_tokens", prompt_tokens)
            p.hincrby(day_key, "completion_tokens", completion_tokens)
            p.hincrby(day_key, "spend_micro", micro)
            p.hincrby(day_key, "cache_hits", int(cache_hit))
            p.expire(day_key, USAGE_TTL_S)
            p.hincrby(f"{self.prefix}usage:{key_id}:total", "spend_micro", micro)
            await p.execute()

    async def day(self, key_id: str, day: str) -> DayUsage:
        d = {k.decode(): int(v) for k, v in (await self.redis.hgetall(f"{self.prefix}usage:{key_id}:{day}")).items()}
        return DayUsage(d.get("requests", 0), d.get("prompt_tokens", 0), d.get("completion_tokens", 0),
                        d.get("spend_micro", 0) / 1e6, d.get("cache_hits", 0))

    async def total_spend(self, key_id: str) -> float:
        v = await self.redis.hget(f"{self.prefix}usage:{key_id}:total", "spend_micro")
        return int(v or 0) / 1e6
