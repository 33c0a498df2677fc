"""API keys: shown once at creation, stored only as a salted, peppered hash, compared in constant time.

A key reads `sk-strata-<id>-<secret>`: the id (public, 12 hex characters) finds the record, the secret
is checked against HMAC-SHA256(pepper, salt + key). The pepper comes from configuration, never from
Redis, so a copy of the database alone cannot test guesses.

Redis (prefix `strata:gw:`): key:{id} hash: hash, salt, tenant, models (JSON list, empty = all),
limits (JSON), budget_usd (0 = none), revoked, created.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

from services.common.errors import InvalidArgumentError, NotFoundError, UnauthenticatedError
from services.gateway.limits import Limits

_KEY = re.compile(r"sk-strata-([0-9a-f]{12})-([A-Za-z0-9_-]{20,100})")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")     # fullmatch: "acme\n" is no tenant
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

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models


class KeyStore:
    def __init__(self, redis: aioredis.Redis, pepper: str, prefix: str = "strata:gw:") -> None:
        if len(pepper) < 16:
            raise ValueError("the key pepper must be at least 16 characters (STRATA_KEY_PEPPER)")
        self.redis = redis
        self._pepper = pepper.encode()
        self.prefix = prefix

    def _digest(self, salt: str, key: str) -> str:
        return hmac.new(self._pepper, (salt + key).encode(), hashlib.sha256).hexdigest()

    async def create(self, tenant: str, models: tuple[str, ...] = (), limits: Limits = Limits(),
                     budget_usd: float = 0.0, tier: str = "") -> tuple[str, ApiKey]:
        """Returns (the key, shown this once, and its record)."""
        if not _TENANT.fullmatch(tenant):
            raise InvalidArgumentError("tenant must be 1-64 characters of letters, digits, '.', '_' or '-' "
                                       "(the first a letter or digit)")
        if not (math.isfinite(budget_usd) and budget_usd >= 0):     # NaN or inf would mean "no budget" unsaid
            raise InvalidArgumentError("budget_usd must be a finite number >= 0 (0 = no budget)")
        if len(tier) > 64:
            raise InvalidArgumentError("tier must be at most 64 characters")
        models = tuple(dict.fromkeys(models))          # each once, in order
        key_id = secrets.token_hex(6)
        key = f"sk-strata-{key_id}-{secrets.token_urlsafe(32)}"
        salt = secrets.token_hex(16)
        record = ApiKey(key_id, tenant, models, limits, float(budget_usd), False, time.time(), tier)
        await self.redis.hset(self.prefix + f"key:{key_id}", mapping={
            "hash": self._digest(salt, key), "salt": salt, "tenant": tenant, "models": json.dumps(list(models)),
            "limits": json.dumps(asdict(limits)), "budget_usd": repr(float(budget_usd)), "revoked": "0",
            "created": repr(record.created_s), "tier": tier})
        return key, record

    async def authenticate(self, key: str) -> ApiKey:
        """The key's record, or UnauthenticatedError (malformed, unknown, wrong secret or revoked: the
        message does not say which of the first three, so ids cannot be probed)."""
        m = _KEY.fullmatch(key or "")
        if not m:
            raise UnauthenticatedError("missing or malformed API key (authorization: Bearer sk-strata-...)")
        raw = await self.redis.hgetall(self.prefix + f"key:{m.group(1)}")
        d = {k.decode(): v.decode() for k, v in raw.items()}
        # compare even when the id is unknown, so timing does not tell known ids from unknown ones
        expected = d.get("hash", "0" * 64)
        ok = hmac.compare_digest(self._digest(d.get("salt", ""), key), expected) and bool(d)
        if not ok:
            raise UnauthenticatedError("invalid API key")
        if d.get("revoked") == "1":
            raise UnauthenticatedError("this API key has been revoked")
        return ApiKey(m.group(1), d["tenant"], tuple(json.loads(d["models"])), Limits(**json.loads(d["limits"])),
                      float(d["budget_usd"]), False, float(d["created"]), d.get("tier", ""))

    async def require(self, key_id: str) -> None:
        """InvalidArgumentError unless key_id is written as CreateKey returns them, NotFoundError unless a
        key (revoked or not) has it."""
        if not _KEY_ID.fullmatch(key_id):
            raise InvalidArgumentError("key_id must be the 12 hexadecimal characters CreateKey returned")
        if not await self.redis.exists(self.prefix + f"key:{key_id}"):
            raise NotFoundError(f"no API key with id {key_id}")

    async def revoke(self, key_id: str) -> None:
        await self.require(key_id)
        await self.redis.hset(self.prefix + f"key:{key_id}", "revoked", "1")
