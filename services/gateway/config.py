"""The gateway's configuration: served models and their prices, request bounds, guardrail modes,
limits behaviour, tiers, `auto` rules, splits and cascades (from a models file: services.common.models_file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from services.common.models_file import DEFAULT_TIERS, AutoRule, Cascade, EmbeddingSpec, ModelsFile, Split, TierSpec

PII_MODES = ("off", "redact", "block")
INJECTION_MODES = ("allow", "flag", "block")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    usd_per_1k_prompt_tokens: float = 0.0
    usd_per_1k_completion_tokens: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.usd_per_1k_prompt_tokens + completion_tokens * self.usd_per_1k_completion_tokens) / 1000


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    models: Mapping[str, ModelPrice] = field(default_factory=lambda: {"SmolLM2-135M-Instruct": ModelPrice(0.01, 0.02)})
    max_prompt_chars: int = 32_000
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    pii_mode: str = "redact"              # off | redact | block
    redact_responses: bool = False        # also redact answers (a stream then arrives as one chunk)
    injection_mode: str = "flag"          # allow | flag | block
    injection_similarity: float = 0.55    # embedding cosine to a known attack that counts (0 = rules only)
    limits_fail_open: bool = True         # Redis unreachable: serve without limits (True) or refuse (False)
    key_fallback_s: float = 300.0         # Redis unreachable: keys verified this recently are still accepted
    key_cache_s: float = 0.5              # a verified key is trusted this long without asking Redis (so a
                                          # revocation reaches every replica within it)
    auth_failures_per_minute: int = 30    # failed API key attempts a client address may make (0 = no limit)
    max_in_flight: int = 1024             # requests this replica carries at once; more are refused at once with
                                          # RESOURCE_EXHAUSTED + retry-after (0 = no cap)
    replay_chunk_words: int = 4           # a cached answer is streamed in chunks of this many words
    auto_rules: tuple[AutoRule, ...] = () # model "auto": the first matching rule picks the model
    auto_default: str = ""                # ... else this one ("" = the first configured model)
    cascades: Mapping[str, Cascade] = field(default_factory=dict)   # unary Generate only
    splits: Mapping[str, Split] = field(default_factory=dict)       # a name -> models by weight
    tiers: Mapping[str, TierSpec] = field(default_factory=lambda: dict(DEFAULT_TIERS))
    default_tier: str = "standard"        # a key created without a tier (and one whose tier is gone)
    model_tiers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)   # model -> tiers allowed (absent: all)
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)     # as the router has them (ListModels)
    embedding: EmbeddingSpec = EmbeddingSpec()   # the Embed RPC's model (the semantic cache's): name, price, tiers
    budget_soft_fraction: float = 0.8     # past this share of a budget: a metric and a log event (budgets.py)

    def __post_init__(self) -> None:
        if self.pii_mode not in PII_MODES or self.injection_mode not in INJECTION_MODES:
            raise ValueError(f"pii_mode must be one of {PII_MODES}, injection_mode one of {INJECTION_MODES}")
        if not self.models:
            raise ValueError("configure at least one model")
        if self.auth_failures_per_minute < 0:
            raise ValueError("auth_failures_per_minute must be >= 0 (0 = no limit)")
        if self.max_in_flight < 0:
            raise ValueError("max_in_flight must be >= 0 (0 = no cap)")
        if not 0 < self.budget_soft_fraction <= 1:
            raise ValueError("budget_soft_fraction must be in (0, 1]")
        named = [r.model for r in self.auto_rules] + [c.to for c in self.cascades.values()] + list(self.cascades) \
            + [m for s in self.splits.values() for m in s.weights] + list(self.model_tiers)
        unknown = sorted({m for m in named + [self.auto_default] if m and m not in self.models})
        if unknown:
            raise ValueError(f"auto rules, splits and cascades name unconfigured models: {', '.join(unknown)}")
        if self.embedding.name in self.models:
            raise ValueError(f"the embedding model's name {self.embedding.name!r} is also a generation model's")
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not a configured tier")
        taken = sorted(set(self.splits) & ({"auto", self.embedding.name} | set(self.models)))
        if taken:
            raise ValueError(f"split names that are also models or 'auto': {', '.join(taken)}")

    @classmethod
    def from_models_file(cls, mf: ModelsFile, **settings) -> GatewayConfig:
        """Models, prices, tiers and routing from a models file; `settings`: the rest of the fields."""
        return cls(models={m.name: ModelPrice(m.usd_per_1k_prompt_tokens, m.usd_per_1k_completion_tokens) for m in mf.models},
                   auto_rules=mf.auto, auto_default=mf.auto_default, cascades=dict(mf.cascades), splits=dict(mf.splits),
                   tiers=dict(mf.tiers), default_tier=mf.default_tier,
                   model_tiers={m.name: m.tiers for m in mf.models if m.tiers},
                   fallbacks={m.name: m.fallbacks for m in mf.models if m.fallbacks}, embedding=mf.embedding,
                   **settings)

    def tier(self, name: str) -> TierSpec:
        """A key's tier: its own when configured, else the default tier."""
        return self.tiers.get(name) or self.tiers[self.default_tier]

    def tier_allows(self, tier: str, model: str) -> bool:
        allowed = self.model_tiers.get(model)
        return not allowed or tier in allowed

    @property
    def first_model(self) -> str:
        """The model a request that names none gets (and `auto`'s default unless auto_default says)."""
        return next(iter(self.models))
