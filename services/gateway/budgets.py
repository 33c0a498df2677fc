"""Budgets with periods, per API key and per tenant: a spend cap in USD over the current UTC day, the current UTC
month, or every day so far ("none": the lifetime total). Spend is what usage.py records (the price of the model
that answered each request), per key and per tenant, by day, month and in total.

Past `soft_fraction` of a budget (default 80%) the gateway counts `strata:budget_soft_limit_total{scope}` and
logs an event once per budget and period; past the budget a request is RESOURCE_EXHAUSTED naming the budget and
when it resets (retry-after, for a period). A tenant's budget is kept in Redis (`tenant:{name}` hash:
budget_usd, period), set with GatewayAdmin.SetTenantBudget (audited), and read through a short cache."""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.common.errors import InvalidArgumentError, ResourceExhaustedError
from services.gateway.audit import AuditLog, entry_fields

PERIODS = ("none", "daily", "monthly")
TENANT_CACHE_S = 1.0


class BudgetExceededError(ResourceExhaustedError):
    limit = "budget"


@dataclass(frozen=True, slots=True)
class Budget:
    usd: float = 0.0                  # 0: none
    period: str = "none"              # none (lifetime) | daily | monthly

    def check(self) -> None:
        if not (math.isfinite(self.usd) and self.usd >= 0):     # NaN or inf would mean "no budget" unsaid
            raise InvalidArgumentError("budget_usd must be a finite number >= 0 (0 = no budget)")
        if self.period not in PERIODS:
            raise InvalidArgumentError(f"budget period must be one of {', '.join(PERIODS)} ('' = none)")


def period_of(period: str, now: float | None = None) -> tuple[str, float | None]:
    """(the current period's label: "" for none, YYYY-MM-DD, or YYYY-MM; when it ends, unix s, None for none)."""
    t = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc)
    if period == "daily":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), (start + dt.timedelta(days=1)).timestamp()
    if period == "monthly":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start.strftime("%Y-%m"), end.timestamp()
    return "", None


def exceeded(scope: str, name: str, budget: Budget, spent: float, now: float | None = None) -> BudgetExceededError:
    """The refusal, naming the budget and when it resets."""
    label, ends = period_of(budget.period, now)
    what = {"none": "budget", "daily": "daily budget", "monthly": "monthly budget"}[budget.period]
    if ends is None:
        return BudgetExceededError(f"the {scope} {name!r} has spent its {what} of ${budget.usd:.2f} (${spent:.4f}); "
                                   "it does not reset: raise it or ask for another key")
    resets = dt.datetime.fromtimestamp(ends, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    wait = max(1.0, ends - (time.time() if now is None else now))
    return BudgetExceededError(f"the {scope} {name!r} has spent its {what} of ${budget.usd:.2f} for {label} "
                               f"(${spent:.4f}); it resets at {resets}", retry_after_s=wait)


class TenantBudgets:
    """Tenants' budgets in Redis, cached for TENANT_CACHE_S (a change reaches every gateway within that)."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "strata:gw:") -> None:
        self.redis, self.prefix = redis, prefix
        self.audit = AuditLog(redis, prefix)
        self._cache: dict[str, tuple[Budget, float]] = {}

    async def get(self, tenant: str) -> Budget:
        known = self._cache.get(tenant)
        now = time.monotonic()
        if known is not None and now - known[1] < TENANT_CACHE_S:
            return known[0]
        raw = await self.redis.hgetall(self.prefix + f"tenant:{tenant}")
        d = {k.decode(): v.decode() for k, v in raw.items()}
        budget = Budget(float(d.get("budget_usd", 0)), d.get("period", "none"))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[tenant] = (budget, now)
        return budget

    async def set(self, tenant: str, budget: Budget, actor: str = "") -> tuple[Budget, Budget]:
        """(before, after); audited as `actor`'s, in the same MULTI."""
        budget.check()
        self._cache.pop(tenant, None)
        before = await self.get(tenant)
        self._cache.pop(tenant, None)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.prefix + f"tenant:{tenant}", mapping={"budget_usd": repr(float(budget.usd)), "period": budget.period})
        pipe.xadd(self.audit.stream, entry_fields(actor, "tenant_budget", "", {"tenant": tenant, **_view(before)},
                                                  {"tenant": tenant, **_view(budget)}))
        await pipe.execute()
        return before, budget


def _view(b: Budget) -> dict:
    return {"budget_usd": b.usd, "period": b.period}
