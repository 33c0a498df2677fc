"""The gateway's admin operations over its own types (no grpc): API keys created, listed, changed, rotated and
revoked (each audited as the acting admin's: `actor`), the audit log and usage read."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidArgumentError
from services.gateway.config import GatewayConfig, ModelPrice
from services.gateway.directory import ModelDirectory, ModelState
from services.gateway.errors import store_unavailable
from services.gateway.audit import AuditEntry
from services.gateway.budgets import Budget, TenantBudgets
from services.gateway.keys import TENANT, ApiKey, KeyStore
from services.gateway.limits import Limits
from services.gateway.stages.auth import Authenticator
from services.gateway.usage import DayUsage, UsageStore, is_utc_day, utc_day


@dataclass(frozen=True, slots=True)
class ModelListing:
    name: str
    price: ModelPrice
    tiers: tuple[str, ...]                # empty: every tier
    fallbacks: tuple[str, ...]
    state: ModelState | None              # None: the router has not said (no answer, or no replica of it)


class GatewayAdmin:
    def __init__(self, config: GatewayConfig, keys: KeyStore, usage: UsageStore, authenticator: Authenticator,
                 directory: ModelDirectory | None = None, tenants: TenantBudgets | None = None) -> None:
        self.config, self.keys, self.usage, self.authenticator = config, keys, usage, authenticator
        self.directory = directory
        self.tenants = tenants if tenants is not None else TenantBudgets(keys.redis, keys.prefix)

    def models(self) -> list[ModelListing]:
        """Every configured model: price, tiers, fallbacks, and its replicas as the router last reported them."""
        return [ModelListing(name, price, self.config.model_tiers.get(name, ()), self.config.fallbacks.get(name, ()),
                             self.directory.get(name) if self.directory is not None else None)
                for name, price in self.config.models.items()]

    def _check(self, models: list[str] | None, tier: str | None) -> None:
        unknown = [m for m in models or () if m not in self.config.models]
        if unknown:
            raise InvalidArgumentError(f"unknown models: {', '.join(unknown)}")
        if tier and tier not in self.config.tiers:
            raise InvalidArgumentError(f"unknown tier {tier!r}: one of {', '.join(self.config.tiers)} "
                                       f"('' = {self.config.default_tier})")

    async def create_key(self, tenant: str, models: list[str], limits: Limits, budget_usd: float,
                         tier: str = "", expires_s: float = 0.0, actor: str = "",
                         budget_period: str = "none") -> tuple[str, ApiKey]:
        """The key (shown this once) and its record."""
        self._check(models, tier)
        with store_unavailable("create a key"):
            return await self.keys.create(tenant, tuple(models), limits, budget_usd, tier, expires_s, actor,
                                          budget_period or "none")

    async def revoke_key(self, key_id: str, actor: str = "") -> None:
        """Revoked everywhere; on this replica at once (other replicas within their key_cache_s)."""
        with store_unavailable("revoke the key"):
            await self.keys.revoke(key_id, actor)
        self.authenticator.forget(key_id)

    async def list_keys(self, tenant: str = "", include_revoked: bool = False) -> list[ApiKey]:
        with store_unavailable("list keys"):
            return await self.keys.list(tenant, include_revoked)

    async def update_key(self, key_id: str, actor: str = "", *, models: list[str] | None = None,
                         limits: Limits | None = None, budget_usd: float | None = None, tier: str | None = None,
                         expires_s: float | None = None, budget_period: str | None = None) -> ApiKey:
        """The key as changed; applied on this replica at once (others within their key_cache_s)."""
        self._check(models, tier)
        with store_unavailable("update the key"):
            _, after = await self.keys.update(key_id, actor, models=None if models is None else tuple(models),
                                              limits=limits, budget_usd=budget_usd, tier=tier, expires_s=expires_s,
                                              budget_period=None if budget_period is None else budget_period or "none")
        self.authenticator.forget(key_id)
        return after

    async def rotate_key(self, key_id: str, overlap_s: float, actor: str = "") -> tuple[str, ApiKey]:
        """A new secret (shown this once); the old one works `overlap_s` more seconds."""
        with store_unavailable("rotate the key"):
            key, after = await self.keys.rotate(key_id, overlap_s, actor)
        self.authenticator.forget(key_id)
        return key, after

    async def set_tenant_budget(self, tenant: str, budget: Budget, actor: str = "") -> Budget:
        """A tenant's budget over all its keys; every gateway applies it within budgets.TENANT_CACHE_S."""
        if not TENANT.fullmatch(tenant):
            raise InvalidArgumentError("tenant must be 1-64 characters of letters, digits, '.', '_' or '-' "
                                       "(the first a letter or digit)")
        with store_unavailable("set the tenant's budget"):
            _, after = await self.tenants.set(tenant, budget, actor)
        return after

    async def audit(self, key_id: str = "", before_id: str = "", limit: int = 100) -> tuple[list[AuditEntry], str]:
        if key_id:
            self.keys._check_id(key_id)
        with store_unavailable("read the audit log"):
            return await self.keys.audit.list(key_id, before_id, limit)

    async def get_usage(self, key_id: str, day: str) -> tuple[str, DayUsage, float, dict[str, DayUsage]]:
        """(the day, its usage, the key's spend over every day, the day's usage by end user); `day` "" = today
        (UTC)."""
        day = day or utc_day()
        if not is_utc_day(day):
            raise InvalidArgumentError("day must be a date written YYYY-MM-DD")
        with store_unavailable("read usage"):
            await self.keys.require(key_id)
            return (day, await self.usage.day(key_id, day), await self.usage.total_spend(key_id),
                    await self.usage.users(key_id, day))
