"""API keys on a real Redis: shown once, stored hashed, revocable, tenant and models kept."""

from __future__ import annotations

import math

import pytest
import redis.asyncio as aioredis

from services.common.errors import InvalidArgumentError, NotFoundError, UnauthenticatedError
from services.gateway.keys import KeyStore
from services.gateway.limits import Limits

PEPPER = "test-pepper-0123456789"


@pytest.fixture()
async def store(redis_url):
    client = aioredis.from_url(redis_url)
    yield KeyStore(client, PEPPER), client
    await client.aclose()


async def test_created_key_authenticates_and_is_never_stored_in_plain_text(store):
    keys, client = store
    key, record = await keys.create("acme", ("SmolLM2-135M-Instruct",), Limits(requests_per_minute=10), 5.0)
    got = await keys.authenticate(key)
    assert got.tenant == "acme" and got.models == ("SmolLM2-135M-Instruct",) and got.budget_usd == 5.0
    assert got.limits == Limits(requests_per_minute=10) and got.key_id == record.key_id
    assert got.allows("SmolLM2-135M-Instruct") and not got.allows("other")
    secret = key.split("-", 3)[3].encode()          # sk-strata-<id>-<secret>; the secret may contain "-"
    assert len(secret) >= 40
    for name in await client.keys("*"):
        dump = b"".join(k + v for k, v in (await client.hgetall(name)).items())
        assert key.encode() not in dump and secret not in dump


async def test_wrong_malformed_unknown_and_revoked_keys_are_refused(store):
    keys, _ = store
    key, record = await keys.create("acme")
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    for bad in ("", "Bearer x", "sk-strata-zzz", tampered, "sk-strata-000000000000-" + "a" * 43):
        with pytest.raises(UnauthenticatedError):
            await keys.authenticate(bad)
    await keys.revoke(record.key_id)
    with pytest.raises(UnauthenticatedError, match="revoked"):
        await keys.authenticate(key)
    with pytest.raises(NotFoundError):
        await keys.revoke("000000000000")
    # upper-case hex is no id (record.key_id.upper() was, when token_hex gave 12 digits: 1 run in 280)
    for not_an_id in ("", "key:*", record.key_id[:-1] + "A", record.key_id + "\n"):
        with pytest.raises(InvalidArgumentError):
            await keys.revoke(not_an_id)


async def test_another_pepper_cannot_verify_stored_keys(store):
    keys, client = store
    key, _ = await keys.create("acme")
    with pytest.raises(UnauthenticatedError):
        await KeyStore(client, "a-different-pepper-value").authenticate(key)


async def test_bad_key_settings_are_refused(store):
    keys, client = store
    for tenant in ("no spaces allowed", "", "-acme", "acme\n", "t" * 65):
        with pytest.raises(InvalidArgumentError):
            await keys.create(tenant)
    for budget in (-1.0, math.nan, math.inf):              # NaN and inf would mean "no budget", unsaid
        with pytest.raises(InvalidArgumentError):
            await keys.create("acme", budget_usd=budget)
    assert not await client.keys("*"), "a refused key was stored"
    with pytest.raises(ValueError):
        KeyStore(client, "short")
