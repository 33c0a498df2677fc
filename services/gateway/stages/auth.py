"""API key verification for the admit stage: a short-lived cache of verified keys, a fallback while Redis
is unreachable, and the per-client limit on failed attempts."""

from __future__ import annotations

import hashlib
import time

from services.common.errors import UnauthenticatedError, UnavailableError
from services.gateway.config import GatewayConfig
from services.gateway.errors import REDIS_ERRORS
from services.gateway.keys import ApiKey, KeyStore
from services.gateway.limits import LimitExceededError


class Authenticator:
    def __init__(self, config: GatewayConfig, keys: KeyStore) -> None:
        self.config, self.keys = config, keys
        self._verified: dict[str, tuple[ApiKey, float]] = {}    # sha256(key) -> (record, verified at)

    async def authenticate(self, bearer: str, client: str = "") -> ApiKey:
        """The key's record. A verification is reused for `key_cache_s` (a revocation on another replica
        takes that long to apply; on this one it applies at once); while Redis is unreachable, one within
        `key_fallback_s` stands in, and keys never seen are refused with UNAVAILABLE. A client address
        (`client`, e.g. "ipv4:10.0.0.7") that failed `auth_failures_per_minute` times in its current minute
        gets RESOURCE_EXHAUSTED with retry-after before its key is even looked at, across replicas."""
        digest = hashlib.sha256(bearer.encode()).hexdigest()
        known = self._verified.get(digest)
        now = time.monotonic()
        if known is not None and known[0].expired():     # expiry applies at once, cached or not
            known = None
        if known is not None and now - known[1] < self.config.key_cache_s:
            return known[0]
        await self._check_failures(client)
        try:
            key = await self.keys.authenticate(bearer)
        except REDIS_ERRORS:
            if known is not None and now - known[1] < self.config.key_fallback_s:
                return known[0]
            raise UnavailableError("cannot verify the API key right now (key store unreachable)") from None
        except UnauthenticatedError:
            self._verified.pop(digest, None)
            await self._count_failure(client)
            raise
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[digest] = (key, now)
        return key

    def forget(self, key_id: str) -> None:
        """Drop the cached verifications of a key (it was revoked on this replica)."""
        for digest in [d for d, (k, _) in self._verified.items() if k.key_id == key_id]:
            del self._verified[digest]

    def _failures_key(self, client: str) -> str:
        return f"{self.keys.prefix}authfail:{client}"

    async def _check_failures(self, client: str) -> None:
        if not client or self.config.auth_failures_per_minute <= 0:
            return
        name = self._failures_key(client)
        try:
            failures, ttl = await self.keys.redis.pipeline(transaction=False).get(name).ttl(name).execute()
        except REDIS_ERRORS:
            return                      # the key check that follows reports the outage
        if failures is not None and int(failures) >= self.config.auth_failures_per_minute:
            raise LimitExceededError("auth_failures", float(max(1, ttl)),
                                     "too many failed API key attempts from this client; retry later")

    async def _count_failure(self, client: str) -> None:
        if not client or self.config.auth_failures_per_minute <= 0:
            return
        name = self._failures_key(client)
        try:
            await self.keys.redis.pipeline(transaction=True).incr(name).expire(name, 60, nx=True).execute()
        except REDIS_ERRORS:
            pass
