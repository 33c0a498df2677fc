"""Budgets with periods, per key and per tenant, on a real Redis: the gateway's pipeline with its real key store,
limits, usage and tenant budgets, and an in-memory router whose every answer costs $0.01 (2 completion tokens at
$5 per 1k)."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from services.common.errors import InvalidArgumentError, ResourceExhaustedError
from services.common.models_file import DEFAULT_TIERS
from services.gateway.admin import GatewayAdmin
from services.gateway.budgets import Budget, TenantBudgets, period_of
from services.gateway.config import GatewayConfig, ModelPrice
from services.gateway.keys import KeyStore
from services.gateway.limits import Limits, RateLimiter
from services.gateway.service import Gateway
from services.gateway.types import Request, Sampling
from services.gateway.usage import UsageStore, utc_day
from tests.unit.test_gateway_pipeline import InMemoryBackends

pytestmark = pytest.mark.asyncio(loop_scope="session")
PEPPER = "test-pepper-0123456789"
TIERS = {n: replace(t, requests_per_minute=0, tokens_per_minute=0) for n, t in DEFAULT_TIERS.items()}


@pytest.fixture()
async def suite(redis_url):
    client = aioredis.from_url(redis_url)
    keys, usage, tenants = KeyStore(client, PEPPER), UsageStore(client), TenantBudgets(client)
    config = GatewayConfig(models={"small": ModelPrice(0.0, 5.0)}, tiers=TIERS)
    gw = Gateway(config, keys, RateLimiter(client), usage, InMemoryBackends(["a", "b"]), tenants=tenants)
    admin = GatewayAdmin(config, keys, usage, gw.authenticator, tenants=tenants)
    yield gw, admin, usage
    await gw.close()
    await usage.close()
    await client.aclose()


def ask() -> Request:
    return Request(model="small", prompt="Say hi", sampling=Sampling(max_tokens=2))


async def spend_until_refused(gw, key: str, most: int = 10) -> tuple[int, ResourceExhaustedError]:
    for answered in range(most):
        try:
            await gw.generate(ask(), key)
        except ResourceExhaustedError as exc:
            return answered, exc
    raise AssertionError(f"{most} requests and no refusal")


async def test_a_daily_key_budget_refuses_past_it_naming_when_it_resets_and_warns_once_past_80_percent(suite, caplog):
    gw, admin, usage = suite
    key, rec = await admin.create_key("acme", [], Limits(), 0.024, budget_period="daily")
    await usage.record(rec.key_id, 0, 0, 5.0, False, day=(dt.date.today() - dt.timedelta(days=1)).isoformat())
    caplog.set_level(logging.WARNING, logger="services.gateway.stages.admit")
    answered, refusal = await spend_until_refused(gw, key)
    assert answered == 3                            # $0.00, 0.01, 0.02 spent before each; $0.03 stops the 4th
    _, ends = period_of("daily")
    tomorrow = dt.datetime.fromtimestamp(ends, dt.timezone.utc).strftime("%Y-%m-%dT00:00:00Z")
    assert "daily budget of $0.02" in str(refusal) and f"for {utc_day()}" in str(refusal)
    assert f"resets at {tomorrow}" in str(refusal) and 0 < refusal.retry_after_s <= 86_400
    assert refusal.status == "RESOURCE_EXHAUSTED" and refusal.limit == "budget"
    assert gw.metrics.budget_soft.labels("key")._value.get() >= 1         # 0.02 of 0.024 is past 80%
    warnings = [r for r in caplog.records if r.getMessage() == "budget past its soft limit"]
    assert len(warnings) == 1 and warnings[0].id == rec.key_id and warnings[0].period == "daily"
    # yesterday's $5 counts for a lifetime budget, not for a daily one
    await admin.update_key(rec.key_id, budget_usd=1.0, budget_period="none")
    _, refusal = await spend_until_refused(gw, key)
    assert "budget of $1.00" in str(refusal) and "does not reset" in str(refusal) and refusal.retry_after_s is None


async def test_a_monthly_budget_counts_this_month_only(suite):
    gw, admin, usage = suite
    key, rec = await admin.create_key("acme", [], Limits(), 0.5, budget_period="monthly")
    first = dt.date.today().replace(day=1)
    await usage.record(rec.key_id, 0, 0, 9.0, False, day=(first - dt.timedelta(days=1)).isoformat())   # last month
    await gw.generate(ask(), key)
    await usage.record(rec.key_id, 0, 0, 0.49, False, day=first.isoformat())                          # this month
    _, refusal = await spend_until_refused(gw, key)
    assert "monthly budget of $0.50" in str(refusal) and f"for {first.strftime('%Y-%m')}" in str(refusal)
    assert await usage.spend(rec.key_id, first.strftime("%Y-%m")) == pytest.approx(0.51, abs=0.011)


async def test_a_tenant_budget_caps_all_its_keys_together_and_is_audited(suite):
    gw, admin, _ = suite
    a, _ = await admin.create_key("acme", [], Limits(), 0.0)
    b, _ = await admin.create_key("acme", [], Limits(), 0.0)
    other, _ = await admin.create_key("globex", [], Limits(), 0.0)
    await admin.set_tenant_budget("acme", Budget(0.012, "daily"), "admin-x")
    await gw.generate(ask(), a)
    await gw.generate(ask(), b)                     # $0.02 spent by the tenant's two keys
    for key in (a, b):
        _, refusal = await spend_until_refused(gw, key, 1)
        assert "tenant 'acme'" in str(refusal) and "daily budget of $0.01" in str(refusal)
    assert (await gw.generate(ask(), other)).text == "ab"                # another tenant is not touched
    assert gw.metrics.budget_soft.labels("tenant")._value.get() >= 1
    entries, _ = await admin.audit()
    assert entries[0].action == "tenant_budget" and entries[0].actor == "admin-x"
    assert entries[0].after == {"tenant": "acme", "budget_usd": 0.012, "period": "daily"}
    for bad in (Budget(-1.0), Budget(float("nan")), Budget(1.0, "weekly")):
        with pytest.raises(InvalidArgumentError):
            await admin.set_tenant_budget("acme", bad)
    with pytest.raises(InvalidArgumentError, match="tenant"):
        await admin.set_tenant_budget("acme corp", Budget(1.0))
