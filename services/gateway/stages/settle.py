"""The settle stage: usage recorded, the limits' reservation reconciled with the tokens really used
(retried in the background while Redis is away), tokens counted in the metrics, the answer stored."""

from __future__ import annotations

import asyncio
import logging

from services.common.aio import cancel_and_wait
from services.common.metrics import GatewayMetrics
from services.gateway.config import GatewayConfig
from services.gateway.errors import REDIS_ERRORS
from services.gateway.limits import RateLimiter, Reservation
from services.gateway.stages.admit import Admission, EmbedAdmission, JobCall
from services.gateway.stages.cache import CacheStage
from services.gateway.stages.route import Generation
from services.gateway.usage import UsageStore, add_rows, usage_row

log = logging.getLogger(__name__)
RECONCILE_ATTEMPTS = 6        # a failed limit reconcile is retried after 1, 2, 4, ... 32 s


class Settle:
    def __init__(self, config: GatewayConfig, limiter: RateLimiter, usage: UsageStore, metrics: GatewayMetrics,
                 cache: CacheStage) -> None:
        self.config, self.limiter, self.usage, self.metrics, self.cache = config, limiter, usage, metrics, cache
        self._background: set[asyncio.Task] = set()

    async def charge(self, a: Admission, prompt_tokens: int, completion_tokens: int, cache_hit: bool = False,
                     count: bool = True, answered_by: str = "") -> None:
        """Record the usage and end the reservation; `count` False for a request that failed or was cut
        short (its tokens are charged, it is not counted among the requests). Charged at the price of the
        model that answered (`answered_by`: a router fallback's), else of the admitted one."""
        price = self.config.models.get(answered_by) or self.config.models[a.model]
        await self._record(a.key.key_id, a.reservation, prompt_tokens, completion_tokens,
                           price.cost(prompt_tokens, completion_tokens), cache_hit, count, a.request.user, a.key.tenant,
                           a.job)

    async def charge_embedding(self, a: EmbedAdmission, tokens: int, count: bool = True) -> None:
        """An Embed call's tokens, at the embedding model's price, as prompt tokens."""
        self.metrics.tokens.labels("embedding").inc(tokens)
        await self._record(a.key.key_id, a.reservation, tokens, 0,
                           tokens * self.config.embedding.usd_per_1k_tokens / 1000, False, count, a.user, a.key.tenant)

    async def _record(self, key_id: str, r: Reservation | None, prompt_tokens: int, completion_tokens: int,
                      cost: float, cache_hit: bool, count: bool, user: str = "", tenant: str = "",
                      job: JobCall | None = None) -> None:
        if job is not None:                   # a job's item: written with its result (services/gateway/jobs)
            row, counts = usage_row(key_id, prompt_tokens, completion_tokens, cost, cache_hit, count, user, tenant)
            add_rows(job.charges, {row: counts})
        elif count or prompt_tokens or completion_tokens:   # in memory, written in batches: Redis may be away
            await self.usage.record(key_id, prompt_tokens, completion_tokens, cost, cache_hit, answered=count,
                                    user=user, tenant=tenant)
        if r is not None:
            try:
                await self.limiter.reconcile(r, prompt_tokens + completion_tokens)
            except REDIS_ERRORS:                  # retried in the background: the concurrency slot comes back
                log.warning("limits could not be reconciled (store unreachable); retrying")
                task = asyncio.create_task(self._reconcile_later(r, prompt_tokens + completion_tokens))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def answered(self, a: Admission, gen: Generation) -> None:
        """After a model's answer was charged: its tokens in the metrics, the answer into the cache."""
        usage = gen.final.usage
        self.metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(usage.completion_tokens)
        await self.cache.store(a, gen.answer())

    async def _reconcile_later(self, r: Reservation, tokens: int) -> None:
        for i in range(RECONCILE_ATTEMPTS):        # 1, 2, 4, ... 32 s: past a Redis restart (reconcile is idempotent)
            await asyncio.sleep(2 ** i)
            try:
                await self.limiter.reconcile(r, tokens)
                return
            except REDIS_ERRORS:
                pass
        log.warning("limits could not be reconciled; the reservation's lease expires on its own")

    async def close(self) -> None:
        await cancel_and_wait(self._background)
