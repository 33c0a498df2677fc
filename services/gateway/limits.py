"""Per-key limits that hold across any number of gateway replicas: one Redis Lua script checks and
reserves atomically, so two replicas can never both admit the last slot.

Before a call the gateway reserves the request and its estimated tokens (prompt + max_tokens); after
it, `reconcile` swaps the estimate for the tokens really used (a stream cut short frees the rest).
Token limits are therefore never overshot by answers still in flight, the failure LiteLLM's users
report most.

Keys (prefix `strata:gw:`), per API key id:
  rl:{key}:req        zset  request id -> admission time (ms): requests in the last minute
  rl:{key}:tok        zset  "request id:tokens" -> admission time: tokens in the last minute
  rl:{key}:day:{d}    int   tokens of UTC day d
  rl:{key}:conc       zset  request id -> lease end (ms): requests in flight; a crashed gateway's
                            leases run out instead of blocking the key forever
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common.errors import InvalidArgumentError, ResourceExhaustedError

WINDOW_MS = 60_000
DAY_MS = 86_400_000

# KEYS: req, tok, day, conc. ARGV: now_ms, request id, tokens, rpm, tpm, tpd, concurrent, lease_ms, day_end_ms
# -> {admitted (1) / refused (0) / can never fit (-1), limit name, retry after ms}
_RESERVE = """
local req, tok, day, conc = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, rid, est = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local rpm, tpm, tpd, cmax = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local lease, day_end, window = tonumber(ARGV[8]), tonumber(ARGV[9]), 60000
redis.call('ZREMRANGEBYSCORE', req, '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', tok, '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', conc, '-inf', now)
if rpm > 0 and redis.call('ZCARD', req) >= rpm then
  local oldest = redis.call('ZRANGE', req, 0, 0, 'WITHSCORES')
  return {0, 'requests_per_minute', tonumber(oldest[2]) + window - now}
end
if tpm > 0 then
  if est > tpm then return {-1, 'tokens_per_minute', 0} end
  local items = redis.call('ZRANGE', tok, 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #items, 2 do used = used + tonumber(string.match(items[i], ':(%d+)$')) end
  if used + est > tpm then
    local freed = 0
    for i = 1, #items, 2 do
      freed = freed + tonumber(string.match(items[i], ':(%d+)$'))
      if used - freed + est <= tpm then return {0, 'tokens_per_minute', tonumber(items[i + 1]) + window - now} end
    end
  end
end
if tpd > 0 then
  if est > tpd then return {-1, 'tokens_per_day', 0} end
  if (tonumber(redis.call('GET', day)) or 0) + est > tpd then return {0, 'tokens_per_day', day_end - now} end
end
if cmax > 0 and redis.call('ZCARD', conc) >= cmax then
  local first = redis.call('ZRANGE', conc, 0, 0, 'WITHSCORES')
  return {0, 'concurrent_requests', math.min(1000, tonumber(first[2]) - now)}
end
redis.call('ZADD', req, now, rid)
redis.call('PEXPIRE', req, window)
redis.call('ZADD', tok, now, rid .. ':' .. est)
redis.call('PEXPIRE', tok, window)
redis.call('INCRBY', day, est)
redis.call('PEXPIRE', day, 2 * 86400000)
redis.call('ZADD', conc, now + lease, rid)
redis.call('PEXPIRE', conc, lease)
return {1, '', 0}
"""

# KEYS: tok, day, conc. ARGV: request id, reserved tokens, actual tokens, admission time (ms). Idempotent: the
# concurrency lease is removed first and only a present one lets the tokens be corrected, so a retry after a
# lost reply changes nothing (a request longer than the lease keeps its estimate: charged, never twice)
_RECONCILE = """
local tok, day, conc = KEYS[1], KEYS[2], KEYS[3]
local rid, est, actual, at = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if redis.call('ZREM', conc, rid) == 0 then return 0 end   -- reconciled already (a retry), or its lease expired
if redis.call('ZREM', tok, rid .. ':' .. est) == 1 then redis.call('ZADD', tok, at, rid .. ':' .. actual) end
if redis.call('EXISTS', day) == 1 then redis.call('INCRBY', day, actual - est) end
return 1
"""


@dataclass(frozen=True, slots=True)
class Limits:
    """0 = unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    concurrent_requests: int = 0

    def __post_init__(self) -> None:
        if min(self.requests_per_minute, self.tokens_per_minute, self.tokens_per_day, self.concurrent_requests) < 0:
            raise InvalidArgumentError("limits must be >= 0 (0 = unlimited)")


@dataclass(frozen=True, slots=True)
class Reservation:
    key_id: str
    request_id: str
    tokens: int
    at_ms: int
    day: int          # UTC day number the tokens were charged to


class LimitExceededError(ResourceExhaustedError):
    def __init__(self, limit: str, retry_after_s: float | None, message: str) -> None:
        super().__init__(message, retry_after_s)
        self.limit = limit


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, prefix: str = "strata:gw:", lease_s: float = 600.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lease_ms = int(lease_s * 1000)
        self._giving_back: set[asyncio.Task] = set()    # reservations whose caller left, being given back
        self._reserve = redis.register_script(_RESERVE)
        self._reconcile = redis.register_script(_RECONCILE)

    def _keys(self, key_id: str, day: int) -> tuple[str, str, str, str]:
        base = f"{self.prefix}rl:{key_id}:"
        return base + "req", base + "tok", f"{base}day:{day}", base + "conc"

    async def reserve(self, key_id: str, limits: Limits, tokens: int, now_ms: int | None = None) -> Reservation:
        """Admit one request of `tokens` estimated tokens, or raise LimitExceededError (with retry-after)."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        now = int(time.time() * 1000) if now_ms is None else now_ms
        day = now // DAY_MS
        rid = uuid.uuid4().hex
        req, tok, day_key, conc = self._keys(key_id, day)
        script = asyncio.ensure_future(self._run_reserve(
            [req, tok, day_key, conc],
            [now, rid, tokens, limits.requests_per_minute, limits.tokens_per_minute, limits.tokens_per_day,
             limits.concurrent_requests, self.lease_ms, (day + 1) * DAY_MS]))
        try:
            admitted, limit, retry_ms = await asyncio.shield(script)
        except asyncio.CancelledError:
            # the caller left while Redis was reserving: a reservation made anyway is given back at once (its
            # concurrency slot would otherwise stay leased for lease_s)
            script.add_done_callback(lambda done: self._give_back(done, Reservation(key_id, rid, tokens, now, day)))
            raise
        limit = limit.decode() if isinstance(limit, bytes) else limit
        if int(admitted) == 1:
            return Reservation(key_id, rid, tokens, now, day)
        if int(admitted) == -1:
            raise LimitExceededError(limit, None, f"the request needs up to {tokens} tokens, more than the key's "
                                                  f"{limit} allows at all: lower max_tokens")
        retry_s = max(0.001, int(retry_ms) / 1000)
        raise LimitExceededError(limit, retry_s, f"{limit} limit reached; retry in {retry_s:.1f} s")

    async def _run_reserve(self, keys: list[str], args: list) -> list:
        return await self._reserve(keys=keys, args=args)

    def _give_back(self, script: asyncio.Future, r: Reservation) -> None:
        if script.cancelled() or script.exception() is not None or int(script.result()[0]) != 1:
            return
        task = asyncio.ensure_future(self._reconcile_quietly(r))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def _reconcile_quietly(self, r: Reservation) -> None:
        try:
            await self.reconcile(r, 0)
        except (RedisError, OSError):      # Redis away: the lease expires on its own
            pass

    async def reconcile(self, r: Reservation, actual_tokens: int) -> None:
        """Charge what the request really used instead of its estimate, and end its concurrency lease."""
        _, tok, day_key, conc = self._keys(r.key_id, r.day)
        await self._reconcile(keys=[tok, day_key, conc], args=[r.request_id, r.tokens, max(0, actual_tokens), r.at_ms])
