"""Usage per key and UTC day in Redis (requests, tokens, spend, cache hits) and the running total spend
that budgets are checked against. Spend is kept in micro-dollars so counters stay integers.

Keys (prefix `strata:gw:`): usage:{key}:{YYYY-MM-DD} hash, usage:{key}:total hash (spend_micro).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

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
    """Counts are added up in memory and written in one pipeline every `flush_s` (and before any read
    on this replica), so a busy gateway makes one Redis round trip per interval, not per request.
    A crash loses at most `flush_s` of usage; other replicas see it that much later."""

    _FIELDS = ("requests", "prompt_tokens", "completion_tokens", "spend_micro", "cache_hits")

    def __init__(self, redis: aioredis.Redis, prefix: str = "strata:gw:", flush_s: float = 0.2) -> None:
        self.redis = redis
        self.prefix = prefix
        self.flush_s = flush_s
        self._pending: dict[tuple[str, str], list[int]] = {}
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def record(self, key_id: str, prompt_tokens: int, completion_tokens: int, spend_usd: float,
                     cache_hit: bool, day: str | None = None) -> None:
        row = self._pending.setdefault((key_id, day or utc_day()), [0] * len(self._FIELDS))
        for i, v in enumerate((1, prompt_tokens, completion_tokens, round(spend_usd * 1e6), int(cache_hit))):
            row[i] += v
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush_later(self.flush_s))

    async def _flush_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.flush()
        except (RedisError, OSError):
            log.warning("usage could not be written (store unreachable); kept for the next flush")
            if self._pending:              # retry with backoff, up to every 5 s
                self._task = asyncio.create_task(self._flush_later(min(5.0, delay * 2)))

    async def flush(self) -> None:
        async with self._lock:
            pending, self._pending = self._pending, {}
            if not pending:
                return
            try:
                async with self.redis.pipeline(transaction=False) as p:
                    for (key_id, day), row in pending.items():
                        day_key = f"{self.prefix}usage:{key_id}:{day}"
                        for name, v in zip(self._FIELDS, row):
                            if v:
                                p.hincrby(day_key, name, v)
                        p.expire(day_key, USAGE_TTL_S)
                        if row[3]:
                            p.hincrby(f"{self.prefix}usage:{key_id}:total", "spend_micro", row[3])
                    await p.execute()
            except BaseException:
                for k, row in pending.items():     # nothing lost: merged back for the next attempt
                    mine = self._pending.setdefault(k, [0] * len(self._FIELDS))
                    for i, v in enumerate(row):
                        mine[i] += v
                raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await self.flush()
        except (RedisError, OSError):
            log.warning("usage lost at shutdown (store unreachable)")

    async def day(self, key_id: str, day: str) -> DayUsage:
        await self.flush()
        d = {k.decode(): int(v) for k, v in (await self.redis.hgetall(f"{self.prefix}usage:{key_id}:{day}")).items()}
        return DayUsage(d.get("requests", 0), d.get("prompt_tokens", 0), d.get("completion_tokens", 0),
                        d.get("spend_micro", 0) / 1e6, d.get("cache_hits", 0))

    async def total_spend(self, key_id: str) -> float:
        """Spend written so far plus what this replica has not written yet."""
        mine = sum(row[3] for (k, _), row in self._pending.items() if k == key_id)
        v = await self.redis.hget(f"{self.prefix}usage:{key_id}:total", "spend_micro")
        return (int(v or 0) + mine) / 1e6
