"""Usage per key and UTC day in Redis (requests, tokens, spend, cache hits) and the running total spend
that budgets are checked against. Spend is kept in micro-dollars so counters stay integers.

Keys (prefix `strata:gw:`): usage:{key}:{YYYY-MM-DD} hash, usage:{key}:{YYYY-MM} and usage:{key}:total hashes
(spend_micro), usage-users:{key}:{YYYY-MM-DD} hash (the day's counts by end user, fields `<count>|<user>`, for
requests that named one: OpenAI's `user`), usage-tenant:{tenant}:{YYYY-MM-DD | YYYY-MM | total} hashes
(spend_micro: what tenant budgets are checked against), usage-batch:{id} (a written batch's marker, kept an
hour).

Counted once: each flush is a batch with an id, applied by one Lua script that first sets the batch's
marker (SET NX). A batch whose reply was lost (Redis restarted or the connection broke after the
script ran) is retried with the same id and skipped, instead of being added a second time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.gateway.errors import REDIS_ERRORS

log = logging.getLogger(__name__)

Row = tuple[str, str, str, str]     # (key id, day, end user, tenant): one pending row of counts
MAX_USERS_LISTED = 1000        # GetUsage's users: a key's callers may name any number of end users
USAGE_TTL_S = 400 * 86_400      # a little over a year of daily records
BATCH_MARKER_TTL_S = 3_600       # how long a written batch is remembered: a retry comes once Redis is back
                                 # (an hour of markers at 5 flushes/s is about 2 MB per gateway)

# apply_usage(k0, a0, ttl): the rows from KEYS[k0] (7 keys each: the key's day, total, by-user and month hashes and
# its tenant's day, month and total hashes) to the end, with their arguments from ARGV[a0] (7 each: the five counts
# in _FIELDS order, the user ("" = none: the by-user hash is not touched) and whether the row names its tenant
# ("1"/"0")); `ttl` for the day hashes. Shared with the job store's commit (services/gateway/jobs/store.py), which
# writes an item's result and its usage in one script.
USAGE_ROWS_LUA = """
local function apply_usage(k0, a0, ttl)
  local fields = {'requests', 'prompt_tokens', 'completion_tokens', 'spend_micro', 'cache_hits'}
  local row = 0
  for k = k0, #KEYS, 7 do
    local base = a0 - 1 + row * 7
    local user = ARGV[base + 6]
    for f = 1, 5 do
      local v = tonumber(ARGV[base + f])
      if v ~= 0 then
        redis.call('HINCRBY', KEYS[k], fields[f], v)
        if user ~= '' then redis.call('HINCRBY', KEYS[k + 2], fields[f] .. '|' .. user, v) end
      end
    end
    redis.call('EXPIRE', KEYS[k], ttl)
    if user ~= '' then redis.call('EXPIRE', KEYS[k + 2], ttl) end
    local spend = tonumber(ARGV[base + 4])
    if spend ~= 0 then
      redis.call('HINCRBY', KEYS[k + 1], 'spend_micro', spend)
      redis.call('HINCRBY', KEYS[k + 3], 'spend_micro', spend)
      redis.call('EXPIRE', KEYS[k + 3], ttl)
      if ARGV[base + 7] == '1' then
        for t = 4, 6 do redis.call('HINCRBY', KEYS[k + t], 'spend_micro', spend) end
        redis.call('EXPIRE', KEYS[k + 4], ttl)
        redis.call('EXPIRE', KEYS[k + 5], ttl)
      end
    end
    row = row + 1
  end
end
"""

# KEYS[1]: the batch's marker, then the rows' keys; ARGV[1]: the marker's TTL, ARGV[2]: the day hashes' TTL, then
# the rows' arguments
_APPLY = USAGE_ROWS_LUA + """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then return 0 end
apply_usage(2, 3, tonumber(ARGV[2]))
return 1
"""


def usage_row(key_id: str, prompt_tokens: int, completion_tokens: int, spend_usd: float, cache_hit: bool,
              answered: bool = True, user: str = "", tenant: str = "", day: str | None = None) -> tuple[Row, list[int]]:
    """One request's usage as a row and its counts (in UsageStore._FIELDS order)."""
    return ((key_id, day or utc_day(), user, tenant),
            [int(answered), prompt_tokens, completion_tokens, round(spend_usd * 1e6), int(cache_hit)])


def rows_keys_args(prefix: str, rows: dict[Row, list[int]]) -> tuple[list[str], list]:
    """The keys and arguments of `apply_usage` for `rows`."""
    keys: list[str] = []
    args: list = []
    for (key_id, day, user, tenant), row in rows.items():
        t = f"{prefix}usage-tenant:{tenant}"
        keys += [f"{prefix}usage:{key_id}:{day}", f"{prefix}usage:{key_id}:total",
                 f"{prefix}usage-users:{key_id}:{day}", f"{prefix}usage:{key_id}:{day[:7]}",
                 f"{t}:{day}", f"{t}:{day[:7]}", f"{t}:total"]
        args += [*row, user, "1" if tenant else "0"]
    return keys, args


def utc_day(ts: float | None = None) -> str:
    when = dt.datetime.now(dt.timezone.utc) if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    return when.strftime("%Y-%m-%d")


def is_utc_day(day: str) -> bool:
    """Whether `day` is a calendar date written as utc_day writes them (YYYY-MM-DD, ASCII digits)."""
    try:
        return dt.date.fromisoformat(day).isoformat() == day
    except ValueError:
        return False


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
        self._pending: dict[Row, list[int]] = {}                       # (key id, day, user, tenant) -> counts
        self._unsent: list[tuple[str, dict[Row, list[int]]]] = []      # (batch id, rows) not yet acknowledged
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._apply = redis.register_script(_APPLY)

    async def record(self, key_id: str, prompt_tokens: int, completion_tokens: int, spend_usd: float,
                     cache_hit: bool, day: str | None = None, answered: bool = True, user: str = "",
                     tenant: str = "") -> None:
        """One request's usage; `answered` False for one that failed or was cut short (its tokens are
        charged, it is not counted among the requests); `user` its end user, also counted by user; `tenant` the
        key's, whose spend is also kept (tenant budgets)."""
        row, counts = usage_row(key_id, prompt_tokens, completion_tokens, spend_usd, cache_hit, answered, user, tenant, day)
        add_rows(self._pending, {row: counts})
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush_later(self.flush_s))

    async def _flush_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.flush()
        except REDIS_ERRORS:
            log.warning("usage could not be written (store unreachable); kept for the next flush")
            if self._unsent or self._pending:      # retry with backoff, up to every 5 s
                self._task = asyncio.create_task(self._flush_later(min(5.0, delay * 2)))

    async def flush(self) -> None:
        """Write what was recorded; batches not acknowledged are retried under their own id, in order."""
        async with self._lock:
            if self._pending:
                if len(self._unsent) > 1:          # the last batch was never sent: it may still grow
                    add_rows(self._unsent[-1][1], self._pending)
                else:
                    self._unsent.append((uuid.uuid4().hex, self._pending))
                self._pending = {}
            while self._unsent:
                batch_id, rows = self._unsent[0]
                keys, args = rows_keys_args(self.prefix, rows)
                await self._apply(keys=[f"{self.prefix}usage-batch:{batch_id}", *keys],
                                  args=[BATCH_MARKER_TTL_S, USAGE_TTL_S, *args])     # raises: the batch stays first in line
                self._unsent.pop(0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await self.flush()
        except REDIS_ERRORS:
            log.warning("usage lost at shutdown (store unreachable)")

    async def day(self, key_id: str, day: str) -> DayUsage:
        await self.flush()
        d = {k.decode(): int(v) for k, v in (await self.redis.hgetall(f"{self.prefix}usage:{key_id}:{day}")).items()}
        return DayUsage(d.get("requests", 0), d.get("prompt_tokens", 0), d.get("completion_tokens", 0),
                        d.get("spend_micro", 0) / 1e6, d.get("cache_hits", 0))

    async def users(self, key_id: str, day: str) -> dict[str, DayUsage]:
        """The day's usage by end user (requests that named one): the MAX_USERS_LISTED with the most requests."""
        await self.flush()
        counts: dict[str, dict[str, int]] = {}
        for field, v in (await self.redis.hgetall(f"{self.prefix}usage-users:{key_id}:{day}")).items():
            name, _, user = field.decode().partition("|")
            counts.setdefault(user, {})[name] = int(v)
        top = sorted(counts.items(), key=lambda kv: (-kv[1].get("requests", 0), kv[0]))[:MAX_USERS_LISTED]
        return {user: DayUsage(d.get("requests", 0), d.get("prompt_tokens", 0), d.get("completion_tokens", 0),
                               d.get("spend_micro", 0) / 1e6, d.get("cache_hits", 0)) for user, d in top}

    async def total_spend(self, key_id: str) -> float:
        """Spend written so far plus what this replica has not written yet."""
        return await self.spend(key_id)

    async def spend(self, key_id: str, period: str = "") -> float:
        """The key's spend in USD in `period`: "" for every day so far, YYYY-MM-DD or YYYY-MM; written and not
        yet written (this replica's)."""
        return await self._spend(f"usage:{key_id}", period, lambda row: row[0] == key_id)

    async def tenant_spend(self, tenant: str, period: str = "") -> float:
        return await self._spend(f"usage-tenant:{tenant}", period, lambda row: row[3] == tenant)

    async def _spend(self, name: str, period: str, mine) -> float:
        batches = [self._pending] + [rows for _, rows in self._unsent]
        pending = sum(counts[3] for rows in batches for row, counts in rows.items()
                      if mine(row) and row[1].startswith(period))
        v = await self.redis.hget(f"{self.prefix}{name}:{period or 'total'}", "spend_micro")
        return (int(v or 0) + pending) / 1e6


def add_rows(into: dict[Row, list[int]], rows: dict[Row, list[int]]) -> None:
    """Add `rows`' counts into `into`'s."""
    for k, row in rows.items():
        mine = into.setdefault(k, [0] * len(row))
        for i, v in enumerate(row):
            mine[i] += v
