"""API keys: shown once at creation, stored only as a salted, peppered hash, compared in constant time.

A key reads `sk-strata-<id>-<secret>`: the id (public, 12 hex characters) finds the record, the secret
is checked against HMAC-SHA256(pepper, salt + key). The pepper comes from configuration, never from
Redis, so a copy of the database alone cannot test guesses.

Redis (prefix `strata:gw:`): key:{id} hash: hash, salt, tenant, models (JSON list, empty = all),
limits (JSON), budget_usd (0 = none), revoked, created, tier, expires (unix s, 0 = never), and after a rotation
rotated (when), prev_hash, prev_salt and prev_until (the old secret is accepted until then). Every change an
admin makes is written with its audit entry in one MULTI (services/gateway/audit.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnauthenticatedError
from services.gateway.audit import AuditLog, entry_fields
from services.gateway.budgets import Budget
from services.gateway.limits import Limits

_KEY = re.compile(r"sk-strata-([0-9a-f]{12})-([A-Za-z0-9_-]{20,100})")
TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")      # fullmatch: "acme\n" is no tenant
_KEY_ID = re.compile(r"[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    tenant: str
    models: tuple[str, ...] = ()          # empty: every model
    limits: Limits = field(default_factory=Limits)
    budget_usd: float = 0.0               # 0: no budget
    revoked: bool = False
    created_s: float = 0.0
    tier: str = ""
    expires_s: float = 0.0                # unix time; 0: never
    rotated_s: float = 0.0                # the last rotation; 0: never
    previous_until_s: float = 0.0         # the secret before the rotation is accepted until then
    budget_period: str = "none"           # budget_usd's period: none (lifetime) | daily | monthly (budgets.py)

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models

    def expired(self, now: float | None = None) -> bool:
        return bool(self.expires_s) and (time.time() if now is None else now) >= self.expires_s


def key_view(k: ApiKey) -> dict[str, Any]:
    """What an admin may see of a key (ListKeys, the audit log): never the key, its secret or its hash."""
    return {"key_id": k.key_id, "tenant": k.tenant, "models": list(k.models), "limits": asdict(k.limits),
            "budget_usd": k.budget_usd, "tier": k.tier, "revoked": k.revoked, "created_s": k.created_s,
            "expires_s": k.expires_s, "rotated_s": k.rotated_s, "previous_until_s": k.previous_until_s,
            "budget_period": k.budget_period}


MAX_ROTATION_OVERLAP_S = 30 * 86_400


class KeyStore:
    def __init__(self, redis: aioredis.Redis, pepper: str, prefix: str = "strata:gw:") -> None:
        if len(pepper) < 16:
            raise ValueError("the key pepper must be at least 16 characters (STRATA_KEY_PEPPER)")
        self.redis = redis
        self._pepper = pepper.encode()
        self.prefix = prefix
        self.audit = AuditLog(redis, prefix)

    def _digest(self, salt: str, key: str) -> str:
        return hmac.new(self._pepper, (salt + key).encode(), hashlib.sha256).hexdigest()

    async def create(self, tenant: str, models: tuple[str, ...] = (), limits: Limits = Limits(),
                     budget_usd: float = 0.0, tier: str = "", expires_s: float = 0.0,
                     actor: str = "", budget_period: str = "none") -> tuple[str, ApiKey]:
        """Returns (the key, shown this once, and its record); audited as `actor`'s."""
        if not TENANT.fullmatch(tenant):
            raise InvalidArgumentError("tenant must be 1-64 characters of letters, digits, '.', '_' or '-' "
                                       "(the first a letter or digit)")
        _check_settings(budget_usd, tier, expires_s, budget_period)
        models = tuple(dict.fromkeys(models))          # each once, in order
        key_id = secrets.token_hex(6)
        key, salt = self._new_secret(key_id)
        record = ApiKey(key_id, tenant, models, limits, float(budget_usd), False, time.time(), tier, float(expires_s),
                        budget_period=budget_period)
        await self._write(key_id, {"hash": self._digest(salt, key), "salt": salt, **_fields(record)}, actor, "create",
                          None, record)
        return key, record

    def _new_secret(self, key_id: str) -> tuple[str, str]:
        return f"sk-strata-{key_id}-{secrets.token_urlsafe(32)}", secrets.token_hex(16)

    async def _write(self, key_id: str, mapping: dict[str, str], actor: str, action: str, before: ApiKey | None,
                     after: ApiKey) -> None:
        """The key's fields and the audit entry, in one MULTI."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.prefix + f"key:{key_id}", mapping=mapping)
        pipe.xadd(self.audit.stream, entry_fields(actor, action, key_id, before and key_view(before), key_view(after)))
        await pipe.execute()

    async def authenticate(self, key: str) -> ApiKey:
        """The key's record, or UnauthenticatedError (malformed, unknown, wrong secret, revoked or expired: the
        message does not say which of the first three, so ids cannot be probed). After a rotation the previous
        secret is accepted until its overlap ends."""
        m = _KEY.fullmatch(key or "")
        if not m:
            raise UnauthenticatedError("missing or malformed API key (authorization: Bearer sk-strata-...)")
        raw = await self.redis.hgetall(self.prefix + f"key:{m.group(1)}")
        d = {k.decode(): v.decode() for k, v in raw.items()}
        # compare even when the id is unknown, so timing does not tell known ids from unknown ones
        expected = d.get("hash", "0" * 64)
        ok = hmac.compare_digest(self._digest(d.get("salt", ""), key), expected) and bool(d)
        if not ok and d.get("prev_hash") and time.time() < float(d.get("prev_until", 0)):
            ok = hmac.compare_digest(self._digest(d["prev_salt"], key), d["prev_hash"])
        if not ok:
            raise UnauthenticatedError("invalid API key")
        record = _record(m.group(1), d)
        if record.revoked:
            raise UnauthenticatedError("this API key has been revoked")
        if record.expired():
            raise UnauthenticatedError("this API key has expired")
        return record

    async def get(self, key_id: str) -> ApiKey:
        """A key's record, revoked or not (InvalidArgumentError / NotFoundError as `require`)."""
        self._check_id(key_id)
        raw = await self.redis.hgetall(self.prefix + f"key:{key_id}")
        if not raw:
            raise NotFoundError(f"no API key with id {key_id}")
        return _record(key_id, {k.decode(): v.decode() for k, v in raw.items()})

    async def list(self, tenant: str = "", include_revoked: bool = False) -> list[ApiKey]:
        """Every key's record (a tenant's only, when given), oldest first."""
        out = []
        async for name in self.redis.scan_iter(match=self.prefix + "key:" + "?" * 12, count=1000):
            key_id = name.decode().rsplit(":", 1)[1]
            if not _KEY_ID.fullmatch(key_id):
                continue
            raw = await self.redis.hgetall(name)
            if not raw:
                continue                                   # deleted between the scan and the read
            record = _record(key_id, {k.decode(): v.decode() for k, v in raw.items()})
            if (not tenant or record.tenant == tenant) and (include_revoked or not record.revoked):
                out.append(record)
        return sorted(out, key=lambda k: (k.created_s, k.key_id))

    async def update(self, key_id: str, actor: str = "", *, models: tuple[str, ...] | None = None,
                     limits: Limits | None = None, budget_usd: float | None = None, tier: str | None = None,
                     expires_s: float | None = None, budget_period: str | None = None) -> tuple[ApiKey, ApiKey]:
        """Change what is given (None: left as it is); (before, after). A revoked key cannot change."""
        def change(before: ApiKey, raw: dict[str, str]) -> tuple[ApiKey, dict[str, str]]:
            after = replace(before, models=before.models if models is None else tuple(dict.fromkeys(models)),
                            limits=before.limits if limits is None else limits,
                            budget_usd=before.budget_usd if budget_usd is None else float(budget_usd),
                            tier=before.tier if tier is None else tier,
                            expires_s=before.expires_s if expires_s is None else float(expires_s),
                            budget_period=before.budget_period if budget_period is None else budget_period)
            _check_settings(after.budget_usd, after.tier, after.expires_s if expires_s is not None else 0.0,
                            after.budget_period)
            return after, {k: v for k, v in _fields(after).items() if k in _SETTINGS}
        return await self._change(key_id, actor, "update", change)

    async def rotate(self, key_id: str, overlap_s: float, actor: str = "") -> tuple[str, ApiKey]:
        """A new secret for the key (its id, settings and usage stay); the current one is still accepted for
        `overlap_s` seconds (0: refused at once here; gateways holding a verification of it, within key_cache_s).
        Returns the new key, shown this once, and the record."""
        if not (math.isfinite(overlap_s) and 0 <= overlap_s <= MAX_ROTATION_OVERLAP_S):
            raise InvalidArgumentError(f"overlap_s must be in [0, {MAX_ROTATION_OVERLAP_S}] seconds")
        key, salt = self._new_secret(key_id)

        def change(before: ApiKey, raw: dict[str, str]) -> tuple[ApiKey, dict[str, str]]:
            now = time.time()
            after = replace(before, rotated_s=now, previous_until_s=now + overlap_s)
            return after, {"hash": self._digest(salt, key), "salt": salt, "prev_hash": raw["hash"],
                           "prev_salt": raw["salt"], "rotated": repr(now), "prev_until": repr(now + overlap_s)}
        _, after = await self._change(key_id, actor, "rotate", change)
        return key, after

    async def _change(self, key_id: str, actor: str, action: str, change) -> tuple[ApiKey, ApiKey]:
        """Read, check and write a key as one optimistic transaction (WATCH, MULTI): `change(before, raw fields)`
        gives the record after and the fields to write; a revoked key refuses every change (FAILED_PRECONDITION),
        and a key changed meanwhile by another admin is read again, so that no change is lost or undone (a
        revocation in between is never overwritten). Written with its audit entry."""
        self._check_id(key_id)
        name = self.prefix + f"key:{key_id}"
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(name)
                    raw = {k.decode(): v.decode() for k, v in (await pipe.hgetall(name)).items()}
                    if not raw:
                        raise NotFoundError(f"no API key with id {key_id}")
                    before = _record(key_id, raw)
                    if before.revoked:
                        raise FailedPreconditionError(f"API key {key_id} is revoked: create another")
                    after, mapping = change(before, raw)
                    pipe.multi()
                    pipe.hset(name, mapping=mapping)
                    pipe.xadd(self.audit.stream, entry_fields(actor, action, key_id, key_view(before), key_view(after)))
                    await pipe.execute()
                    return before, after
                except WatchError:
                    continue

    def _check_id(self, key_id: str) -> None:
        if not _KEY_ID.fullmatch(key_id):
            raise InvalidArgumentError("key_id must be the 12 hexadecimal characters CreateKey returned")

    async def require(self, key_id: str) -> None:
        """InvalidArgumentError unless key_id is written as CreateKey returns them, NotFoundError unless a
        key (revoked or not) has it."""
        self._check_id(key_id)
        if not await self.redis.exists(self.prefix + f"key:{key_id}"):
            raise NotFoundError(f"no API key with id {key_id}")

    async def revoke(self, key_id: str, actor: str = "") -> None:
        """Revoked for good (revoking a revoked key changes nothing and is not audited again)."""
        try:
            await self._change(key_id, actor, "revoke", lambda before, raw: (replace(before, revoked=True),
                                                                             {"revoked": "1"}))
        except FailedPreconditionError:
            pass


def _check_settings(budget_usd: float, tier: str, expires_s: float, budget_period: str = "none") -> None:
    Budget(budget_usd, budget_period).check()
    if len(tier) > 64:
        raise InvalidArgumentError("tier must be at most 64 characters")
    if not math.isfinite(expires_s) or expires_s < 0 or (expires_s and expires_s <= time.time()):
        raise InvalidArgumentError("expires must be a time in the future (unix seconds), or 0 for never")


_SETTINGS = ("models", "limits", "budget_usd", "tier", "expires", "budget_period")   # what UpdateKey may write


def _fields(k: ApiKey) -> dict[str, str]:
    """The hash fields of a record's settings (not its secret)."""
    return {"tenant": k.tenant, "models": json.dumps(list(k.models)), "limits": json.dumps(asdict(k.limits)),
            "budget_usd": repr(float(k.budget_usd)), "revoked": "1" if k.revoked else "0", "created": repr(k.created_s),
            "tier": k.tier, "expires": repr(k.expires_s), "rotated": repr(k.rotated_s),
            "prev_until": repr(k.previous_until_s), "budget_period": k.budget_period}


def _record(key_id: str, d: dict[str, str]) -> ApiKey:
    return ApiKey(key_id, d["tenant"], tuple(json.loads(d["models"])), Limits(**json.loads(d["limits"])),
                  float(d["budget_usd"]), d.get("revoked") == "1", float(d["created"]), d.get("tier", ""),
                  float(d.get("expires", 0)), float(d.get("rotated", 0)), float(d.get("prev_until", 0)),
                  d.get("budget_period", "none"))
