"""The gateway's admin operations over its own types (no grpc): API keys created and revoked, usage read."""

from __future__ import annotations

from services.common.errors import InvalidArgumentError
from services.gateway.config import GatewayConfig
from services.gateway.errors import store_unavailable
from services.gateway.keys import ApiKey, KeyStore
from services.gateway.limits import Limits
from services.gateway.stages.auth import Authenticator
from services.gateway.usage import DayUsage, UsageStore, is_utc_day, utc_day


class GatewayAdmin:
    def __init__(self, config: GatewayConfig, keys: KeyStore, usage: UsageStore, authenticator: Authenticator) -> None:
        self.config, self.keys, self.usage, self.authenticator = config, keys, usage, authenticator

    async def create_key(self, tenant: str, models: list[str], limits: Limits, budget_usd: float,
                         tier: str = "") -> tuple[str, ApiKey]:
        """The key (shown this once) and its record."""
        unknown = [m for m in models if m not in self.config.models]
        if unknown:
            raise InvalidArgumentError(f"unknown models: {', '.join(unknown)}")
        with store_unavailable("create a key"):
            return await self.keys.create(tenant, tuple(models), limits, budget_usd, tier)

    async def revoke_key(self, key_id: str) -> None:
        """Revoked everywhere; on this replica at once (other replicas within their key_cache_s)."""
        with store_unavailable("revoke the key"):
            await self.keys.revoke(key_id)
        self.authenticator.forget(key_id)

    async def get_usage(self, key_id: str, day: str) -> tuple[str, DayUsage, float]:
        """(the day, its usage, the key's spend over every day); `day` "" = today (UTC)."""
        day = day or utc_day()
        if not is_utc_day(day):
            raise InvalidArgumentError("day must be a date written YYYY-MM-DD")
        with store_unavailable("read usage"):
            await self.keys.require(key_id)
            return day, await self.usage.day(key_id, day), await self.usage.total_spend(key_id)
