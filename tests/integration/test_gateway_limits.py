"""Per-key limits on a real Redis, with two limiter instances on separate connections standing in for
two gateway replicas: never more admitted than the limit, retry-after given, estimates reconciled."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from services.common.errors import InvalidArgumentError
from services.gateway.limits import DAY_MS, WINDOW_MS, LimitExceededError, Limits, RateLimiter


@pytest.fixture()
async def replicas(redis_url):
    clients = [aioredis.from_url(redis_url), aioredis.from_url(redis_url)]
    yield [RateLimiter(c) for c in clients]
    for c in clients:
        await c.aclose()


async def hammer(replicas, n: int, limits: Limits, tokens: int, now_ms: int) -> tuple[list, list]:
    async def one(i: int):
        try:
            return await replicas[i % 2].reserve("k1", limits, tokens, now_ms=now_ms)
        except LimitExceededError as exc:
            return exc
    results = await asyncio.gather(*(one(i) for i in range(n)))
    return ([r for r in results if not isinstance(r, Exception)], [r for r in results if isinstance(r, Exception)])


async def test_requests_per_minute_is_exact_across_two_replicas(replicas):
    now = 1_000_000_000_000
    ok, refused = await hammer(replicas, 200, Limits(requests_per_minute=50), 1, now)
    assert len(ok) == 50 and len(refused) == 150
    assert {e.limit for e in refused} == {"requests_per_minute"}
    assert all(0 < e.retry_after_s <= 60 for e in refused)
    # a minute later the window has moved on
    ok, _ = await hammer(replicas, 10, Limits(requests_per_minute=50), 1, now + WINDOW_MS + 1)
    assert len(ok) == 10


async def test_tokens_per_minute_reserves_estimates_and_reconcile_frees_the_unused(replicas):
    now = 1_000_000_000_000
    limits = Limits(tokens_per_minute=1000)
    ok, refused = await hammer(replicas, 40, limits, 100, now)
    assert len(ok) == 10 and {e.limit for e in refused} == {"tokens_per_minute"}
    for r in ok[:5]:                                  # five answers used 20 of their 100 reserved tokens
        await replicas[0].reconcile(r, 20)
    more, _ = await hammer(replicas, 40, limits, 100, now + 1)
    assert len(more) == 4                              # 5 * 80 freed = 400 tokens = 4 more requests
    with pytest.raises(LimitExceededError, match="more than the key's tokens_per_minute allows") as err:
        await replicas[1].reserve("k1", limits, 1001, now_ms=now)
    assert err.value.retry_after_s is None


async def test_tokens_per_day_and_its_retry_after_reaches_midnight(replicas):
    day_start = 20_000 * DAY_MS
    limits = Limits(tokens_per_day=500)
    ok, refused = await hammer(replicas, 20, limits, 100, day_start + 1000)
    assert len(ok) == 5 and {e.limit for e in refused} == {"tokens_per_day"}
    assert refused[0].retry_after_s == pytest.approx((DAY_MS - 1000) / 1000)
    ok, _ = await hammer(replicas, 3, limits, 100, day_start + DAY_MS)   # the next UTC day
    assert len(ok) == 3


async def test_concurrent_requests_are_leased_and_released(replicas):
    now = 1_000_000_000_000
    limits = Limits(concurrent_requests=3)
    ok, refused = await hammer(replicas, 10, limits, 1, now)
    assert len(ok) == 3 and {e.limit for e in refused} == {"concurrent_requests"}
    await replicas[1].reconcile(ok[0], 1)
    ok2, _ = await hammer(replicas, 10, limits, 1, now + 1)
    assert len(ok2) == 1
    # a gateway that died holding its leases blocks the key only until the leases run out
    ok3, _ = await hammer(replicas, 10, limits, 1, now + replicas[0].lease_ms + 10)
    assert len(ok3) == 3


async def test_a_reconcile_retried_after_a_lost_reply_corrects_the_tokens_once(replicas):
    """The gateway retries a reconcile that failed (Redis restarting): a second run of the same one must not
    hand the unused tokens back twice."""
    day_start = 20_001 * DAY_MS
    limits = Limits(tokens_per_day=500)
    ok, _ = await hammer(replicas, 5, limits, 100, day_start + 1000)
    assert len(ok) == 5
    for _ in range(3):
        await replicas[0].reconcile(ok[0], 20)        # 80 tokens back, once
    more, refused = await hammer(replicas, 10, limits, 40, day_start + 2000)
    assert len(more) == 2 and {e.limit for e in refused} == {"tokens_per_day"}


async def test_keys_do_not_share_limits_and_bad_limits_are_refused(replicas):
    now = 1_000_000_000_000
    await replicas[0].reserve("a", Limits(requests_per_minute=1), 1, now_ms=now)
    await replicas[0].reserve("b", Limits(requests_per_minute=1), 1, now_ms=now)
    with pytest.raises(LimitExceededError):
        await replicas[1].reserve("a", Limits(requests_per_minute=1), 1, now_ms=now)
    with pytest.raises(InvalidArgumentError):         # INVALID_ARGUMENT at CreateKey, not INTERNAL
        Limits(requests_per_minute=-1)


async def test_usage_whose_write_reply_was_lost_is_counted_once(redis_url):
    """A flush that reached Redis but whose reply was lost (a restart or a broken connection right after
    the write) is retried under its batch id and skipped: the usage is counted once, not twice; counts
    recorded while a batch waits are written after it, and nothing is lost."""
    from services.gateway.usage import UsageStore

    client = aioredis.from_url(redis_url)
    usage = UsageStore(client, prefix="strata:test-once:", flush_s=60)
    applied, lose_reply = usage._apply, [True]

    async def write_then_lose_the_reply(**kw):
        out = await applied(**kw)
        if lose_reply[0]:
            lose_reply[0] = False
            raise ConnectionError("connection lost before the reply")
        return out
    usage._apply = write_then_lose_the_reply
    try:
        await usage.record("k1", 10, 20, 0.5, cache_hit=False, day="2026-11-26")
        with pytest.raises(ConnectionError):
            await usage.flush()
        await usage.record("k1", 1, 2, 0.25, cache_hit=True, day="2026-11-26")    # while the first batch waits
        # until the retry an unacknowledged batch also counts as unwritten: a budget errs on the safe side
        assert await usage.total_spend("k1") == pytest.approx(0.5 + 0.5 + 0.25)
        day = await usage.day("k1", "2026-11-26")                         # flushes: the retry, then the new row
        assert (day.requests, day.prompt_tokens, day.completion_tokens, day.cache_hits) == (2, 11, 22, 1)
        assert day.spend_usd == pytest.approx(0.75) and await usage.total_spend("k1") == pytest.approx(0.75)
    finally:
        await client.aclose()


async def test_a_caller_gone_while_its_reservation_is_made_gets_its_concurrency_slot_given_back(redis_url):
    """The caller hangs up after Redis reserved its slot but before the answer reached the gateway: the
    reservation is reconciled at once instead of holding the slot for its 600 s lease."""
    from services.common.models_file import TierSpec
    from services.gateway.config import GatewayConfig
    from services.gateway.keys import ApiKey
    from services.gateway.stages.admit import Admit

    reserved = asyncio.Event()

    class SlowLimiter(RateLimiter):
        async def _run_reserve(self, keys, args):
            r = await super()._run_reserve(keys, args)    # reserved in Redis ...
            reserved.set()
            await asyncio.sleep(1.0)                      # ... and the answer is slow to come back: the caller leaves
            return r

    client = aioredis.from_url(redis_url)
    limiter = SlowLimiter(client)
    admit = Admit(GatewayConfig(), None, None, limiter, None, None, None)
    key = ApiKey("0123456789ab", "acme", limits=Limits(concurrent_requests=1))
    task = asyncio.create_task(admit._reserve(key, TierSpec("t"), 10))
    await asyncio.wait_for(reserved.wait(), 10)
    conc = [k async for k in client.scan_iter("strata:gw:rl:*:conc")]
    assert conc and await client.zcard(conc[0]) == 1           # reserved while the caller was leaving
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if await client.zcard(conc[0]) == 0:
            break
        await asyncio.sleep(0.05)
    assert await client.zcard(conc[0]) == 0                    # given back, not leased for 600 s
    await limiter.reserve(key.key_id, key.limits, 10)          # the slot is free again
    await client.aclose()
