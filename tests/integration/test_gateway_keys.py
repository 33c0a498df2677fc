"""API keys on a real Redis: shown once, stored hashed, revocable, tenant and models kept."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import redis.asyncio as aioredis

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnauthenticatedError
from services.gateway.keys import KeyStore, key_view
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
    assert await dump(client)
    assert key.encode() not in await dump(client) and secret not in await dump(client)


async def dump(client) -> bytes:
    """Every byte Redis holds: the keys' hashes and the audit stream."""
    out = b""
    for name in await client.keys("*"):
        kind = await client.type(name)
        if kind == b"hash":
            out += b"".join(k + v for k, v in (await client.hgetall(name)).items())
        elif kind == b"stream":
            out += b"".join(k + v for _, fields in await client.xrange(name) for k, v in fields.items())
        else:
            raise AssertionError(f"unexpected {kind!r} at {name!r}")
    return out


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


async def test_keys_are_listed_without_secrets_by_tenant_and_revocation(store):
    keys, _ = store
    a, ra = await keys.create("acme", actor="admin-x")
    _, rb = await keys.create("globex", ("m1",), Limits(tokens_per_day=100), 2.0, "premium", actor="admin-x")
    _, rc = await keys.create("acme", actor="admin-x")
    await keys.revoke(rc.key_id, "admin-x")
    assert [k.key_id for k in await keys.list()] == [ra.key_id, rb.key_id]
    assert [k.key_id for k in await keys.list(include_revoked=True)] == [ra.key_id, rb.key_id, rc.key_id]
    assert [k.key_id for k in await keys.list("acme")] == [ra.key_id]
    listed = (await keys.list("globex"))[0]
    assert (listed.models, listed.limits, listed.budget_usd, listed.tier) == (("m1",), Limits(tokens_per_day=100), 2.0,
                                                                             "premium")
    assert set(key_view(listed)) == {"key_id", "tenant", "models", "limits", "budget_usd", "tier", "revoked",
                                     "created_s", "expires_s", "rotated_s", "previous_until_s", "budget_period"}


async def test_an_update_changes_what_it_names_and_nothing_else(store):
    keys, _ = store
    key, rec = await keys.create("acme", ("m1",), Limits(requests_per_minute=5), 1.0, "free")
    before, after = await keys.update(rec.key_id, "admin-x", limits=Limits(tokens_per_minute=50), tier="premium")
    assert before == rec and (after.limits, after.tier) == (Limits(tokens_per_minute=50), "premium")
    assert (after.models, after.budget_usd) == (("m1",), 1.0)
    assert await keys.authenticate(key) == after
    _, after = await keys.update(rec.key_id, models=(), budget_usd=0.0)
    assert (after.models, after.budget_usd, after.tier) == ((), 0.0, "premium")
    for bad in ({"budget_usd": -1.0}, {"budget_usd": math.nan}, {"expires_s": 1.0}, {"tier": "x" * 65},
                {"limits": None, "expires_s": -5.0}):
        with pytest.raises(InvalidArgumentError):
            await keys.update(rec.key_id, **bad)
    await keys.revoke(rec.key_id)
    with pytest.raises(FailedPreconditionError, match="revoked"):
        await keys.update(rec.key_id, budget_usd=3.0)
    with pytest.raises(NotFoundError):
        await keys.update("000000000000", budget_usd=3.0)


async def test_a_key_past_its_expiry_is_refused(store):
    keys, _ = store
    key, rec = await keys.create("acme", expires_s=time.time() + 0.5)
    assert (await keys.authenticate(key)).expires_s == rec.expires_s
    await asyncio.sleep(0.6)
    with pytest.raises(UnauthenticatedError, match="expired"):
        await keys.authenticate(key)
    _, after = await keys.update(rec.key_id, expires_s=0.0)             # extended: never expires
    assert (await keys.authenticate(key)) == after
    with pytest.raises(InvalidArgumentError, match="future"):
        await keys.create("acme", expires_s=time.time() - 1)


async def test_rotation_gives_a_new_secret_and_keeps_the_old_one_for_the_overlap(store):
    keys, client = store
    old, rec = await keys.create("acme", ("m1",))
    new, after = await keys.rotate(rec.key_id, 0.5, "admin-x")
    assert new != old and new.startswith(f"sk-strata-{rec.key_id}-") and after.models == ("m1",)
    assert (await keys.authenticate(new)).key_id == (await keys.authenticate(old)).key_id == rec.key_id
    await asyncio.sleep(0.6)
    with pytest.raises(UnauthenticatedError, match="invalid"):
        await keys.authenticate(old)
    newer, _ = await keys.rotate(rec.key_id, 0)                          # no overlap: the last one stops at once
    with pytest.raises(UnauthenticatedError):
        await keys.authenticate(new)
    assert (await keys.authenticate(newer)).key_id == rec.key_id
    for secret in (old, new, newer):
        assert secret.encode() not in await dump(client) and secret.split("-", 3)[3].encode() not in await dump(client)
    for bad in (-1.0, math.inf, 31 * 86_400.0):
        with pytest.raises(InvalidArgumentError):
            await keys.rotate(rec.key_id, bad)
    await keys.revoke(rec.key_id)
    with pytest.raises(FailedPreconditionError):
        await keys.rotate(rec.key_id, 10)


async def test_every_admin_action_is_audited_newest_first_with_before_and_after(store):
    keys, client = store
    key, rec = await keys.create("acme", actor="admin-a")
    await keys.update(rec.key_id, "admin-b", budget_usd=4.0)
    rotated, _ = await keys.rotate(rec.key_id, 60, "admin-a")
    _, other = await keys.create("globex", actor="admin-a")
    await keys.revoke(rec.key_id, "admin-b")
    entries, more = await keys.audit.list(rec.key_id)
    assert more == "" and [(e.action, e.actor) for e in entries] == [
        ("revoke", "admin-b"), ("rotate", "admin-a"), ("update", "admin-b"), ("create", "admin-a")]
    revoke, rotate, update, create = entries
    assert create.before is None and create.after["tenant"] == "acme" and create.after["revoked"] is False
    assert (update.before["budget_usd"], update.after["budget_usd"]) == (0.0, 4.0)
    assert rotate.after["previous_until_s"] - rotate.after["rotated_s"] == pytest.approx(60)
    assert (revoke.before["revoked"], revoke.after["revoked"]) == (False, True)
    assert all(e.key_id == rec.key_id and e.at_s > 0 for e in entries)
    assert [e.entry_id for e in entries] == sorted((e.entry_id for e in entries), key=lambda i: tuple(map(int, i.split("-"))),
                                                   reverse=True)
    for bad in ("x", "1-2-3", "-", "1 -2", "9" * 30):
        with pytest.raises(InvalidArgumentError, match="before_id"):
            await keys.audit.list(before_id=bad)
    page, after = await keys.audit.list(limit=2)                          # every key's, two at a time
    rest, end = await keys.audit.list(before_id=after, limit=10)
    assert [e.key_id for e in page] == [rec.key_id, other.key_id] and len(rest) == 3 and end == ""
    stored = await dump(client)
    for secret in (key, rotated):
        assert secret.split("-", 3)[3].encode() not in stored
    for _, fields in await client.xrange(keys.audit.stream):
        assert b"salt" not in b"".join(fields.values()) and b"hash" not in b"".join(fields.values())


async def test_changes_racing_a_revocation_never_bring_the_key_back(store, redis_url):
    """Updates and rotations read, check and write the key in one WATCH/MULTI: one that races a revocation either
    lands before it or is refused after it, never writes the key live again."""
    keys, _ = store
    for _ in range(5):
        _, rec = await keys.create("acme")
        other = KeyStore(aioredis.from_url(redis_url), PEPPER)         # another gateway's connection
        jobs = [keys.update(rec.key_id, budget_usd=float(i)) for i in range(6)] + [keys.rotate(rec.key_id, 0)] + \
            [other.revoke(rec.key_id)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        assert all(r is None or isinstance(r, (tuple, FailedPreconditionError)) for r in results), results
        assert (await keys.get(rec.key_id)).revoked
        await other.redis.aclose()
