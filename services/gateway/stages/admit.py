"""The admit stage: API key → validation (the model resolved: named, `auto` or a split; its tier and
capability checked; the priority capped by the tier) → shedding (the model's load against the tier's
thresholds: before the screens, so that a refusal under load costs little) → guardrails → budget → limits
reserved (estimated prompt + max_tokens; the key's limits, else its tier's). What it returns is all a later stage may use of the request."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Sequence

from opentelemetry import trace

from services.common import telemetry
from services.common.errors import (InvalidArgumentError, NotFoundError, PermissionDeniedError, ResourceExhaustedError,
                                    UnavailableError)
from services.common.models_file import TierSpec
from services.common.metrics import GatewayMetrics
from services.gateway.budgets import Budget, TenantBudgets, exceeded, period_of
from services.gateway.config import GatewayConfig
from services.gateway.directory import ModelDirectory
from services.gateway.errors import REDIS_ERRORS
from services.gateway.keys import ApiKey
from services.gateway.limits import Limits, RateLimiter, Reservation
from services.gateway.selection import select_model, sticky_pick
from services.gateway.stages.auth import Authenticator
from services.gateway.stages.guard import Guard
from services.gateway.types import Request
from services.gateway.usage import Row, UsageStore

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant", "tool")
SHED_RETRY_AFTER_S = 1.0
MAX_EMBED_INPUTS = 2048               # texts in one Embed call (OpenAI's bound)
MAX_SAMPLES = 16                      # n: samples of one prompt (the engine's bound)
MAX_USER_CHARS = 256                  # an end user's identifier (`user`)
JOB_PRIORITY = 1_000_000              # a background job's items: after every interactive request, whose priorities
                                      # are capped below it, so jobs use spare capacity only


@dataclass(slots=True)
class JobCall:
    """A background job's item run through the pipeline (services/gateway/jobs): the job's key, read again for
    each item (a revoked key stops its jobs), instead of a bearer; its usage is kept here, not recorded, and the
    worker writes it with the item's result in one script, so that an item retried after a worker died is
    charged once."""

    key: ApiKey
    charges: dict[Row, list[int]] = field(default_factory=dict)


class ShedError(ResourceExhaustedError):
    """The model is overloaded and the key's tier is among those refused first."""

    limit = "shed"


@dataclass(slots=True)
class Admission:
    """A request let in (a value: built once, never changed)."""

    request_id: str
    request: Request                  # guarded: PII redacted, so nothing after admission sees the original
    key: ApiKey
    model: str                        # resolved: a configured model the key may use
    max_tokens: int                   # resolved: the request's, or the default
    route: str                        # how the model was chosen: named, default, auto:<rule>, split:<name>
    tier: str                         # the key's tier as configured (the default tier for none)
    priority: int                     # the request's, raised to its tier's floor
    flags: tuple[str, ...]            # guardrail findings
    reservation: Reservation | None   # None: the key has no limits, or the limit store was away (fail-open)
    job: JobCall | None = None        # a background job's item (its usage goes with its result)


@dataclass(slots=True)
class EmbedAdmission:
    """An Embed call let in."""

    request_id: str
    key: ApiKey
    model: str                        # the embedding model's configured name
    reservation: Reservation | None
    user: str = ""                    # the caller's end user (usage is also counted per user)


class Admit:
    def __init__(self, config: GatewayConfig, auth: Authenticator, guard: Guard, limiter: RateLimiter,
                 usage: UsageStore, tracer: trace.Tracer, metrics: GatewayMetrics,
                 directory: ModelDirectory | None = None, tenants: TenantBudgets | None = None) -> None:
        self.config, self.auth, self.guard, self.limiter, self.usage = config, auth, guard, limiter, usage
        self.tracer, self.metrics, self.directory = tracer, metrics, directory
        self.tenants = tenants                # None: no tenant budgets (tests without Redis)
        self._warned: dict[tuple[str, str], tuple[str, Budget]] = {}   # soft limits logged, by budget and period

    async def __call__(self, request: Request, bearer: str, client: str, job: JobCall | None = None) -> Admission:
        with telemetry.child_span(self.tracer, "auth") as span:
            key = job.key if job is not None else await self.auth.authenticate(bearer, client)
            span.set_attribute("strata.key_id", key.key_id)
        tier = self.config.tier(key.tier)
        with telemetry.child_span(self.tracer, "guardrails") as span:
            model, route, max_tokens = self._validate(request, key, tier)
            priority = JOB_PRIORITY if job is not None else min(max(request.priority, tier.priority_floor),
                                                                JOB_PRIORITY - 1)
            self._shed(model, tier, span)         # before the screens: a refusal under load costs little
            if self.directory is not None:
                self.directory.admitted(model)    # in flight until the next view of the model includes it
            request, flags = await self.guard(request)
            span.set_attributes({"strata.model": model, "strata.route": route, "strata.tier": tier.name,
                                 "strata.priority": priority, "strata.flags": flags})
            for f in flags:
                self.metrics.guardrails.labels(f).inc()
        self.metrics.routed.labels(model, route.split(":")[0]).inc()
        with telemetry.child_span(self.tracer, "limits") as span:
            await self._check_budget(key)
            tokens = request.num_chars // 4 + 1 + max_tokens * request.samples   # estimated prompt + each sample's max
            span.set_attribute("strata.reserved_tokens", tokens)
            reservation = await self._reserve(key, tier, tokens)
        return Admission(uuid.uuid4().hex, request, key, model, max_tokens, route, tier.name, priority, tuple(flags),
                         reservation, job)

    async def embedding(self, model: str, texts: Sequence[str], bearer: str, client: str,
                        user: str = "") -> EmbedAdmission:
        """An Embed call let in: the key, its models and tier, the input's bounds, the budget, and the limits
        reserved for the texts' estimated tokens. No shedding (the cache's model is not a replica's) and no
        guardrail (redacting a text would change its vector; it goes to the cache's model and nowhere else)."""
        with telemetry.child_span(self.tracer, "auth") as span:
            key = await self.auth.authenticate(bearer, client)
            span.set_attribute("strata.key_id", key.key_id)
        tier = self.config.tier(key.tier)
        spec = self.config.embedding
        model = model or spec.name
        if model != spec.name:
            hint = " (a generation model; embeddings come from the embedding model)" if model in self.config.models else ""
            raise NotFoundError(f"unknown embedding model {model!r}{hint}; this suite embeds with {spec.name!r}")
        if not key.allows(model):
            raise PermissionDeniedError(f"this API key may not use model {model!r}")
        if not spec.allows(tier.name):
            raise PermissionDeniedError(f"model {model!r} is not open to the {tier.name!r} tier")
        if not 1 <= len(texts) <= MAX_EMBED_INPUTS:
            raise InvalidArgumentError(f"the input must hold 1 to {MAX_EMBED_INPUTS} texts, not {len(texts)}")
        _check_user(user)
        for i, t in enumerate(texts):
            if not t:
                raise InvalidArgumentError(f"input {i} is empty")
            if len(t) > self.config.max_prompt_chars:
                raise InvalidArgumentError(f"input {i} is longer than {self.config.max_prompt_chars} characters")
        self.metrics.routed.labels(model, "named").inc()
        with telemetry.child_span(self.tracer, "limits") as span:
            await self._check_budget(key)
            tokens = sum(len(t) // 4 + 2 for t in texts)          # estimated, reconciled with the model's count
            span.set_attribute("strata.reserved_tokens", tokens)
            reservation = await self._reserve(key, tier, tokens)
        return EmbedAdmission(uuid.uuid4().hex, key, model, reservation, user)

    def able(self, model: str, chat: bool) -> bool:
        """Whether `model` can take the request as far as the gateway knows (unknown: yes)."""
        return not chat or self.directory is None or self.directory.serves_chat(model) is not False

    def _validate(self, request: Request, key: ApiKey, tier: TierSpec) -> tuple[str, str, int]:
        """(the model, how it was chosen, max_tokens)."""
        chat = request.messages is not None
        usable = lambda m: key.allows(m) and self.config.tier_allows(tier.name, m) and self.able(m, chat)  # noqa: E731
        first_usable = lambda fallback: next((m for m in self.config.models if usable(m)), fallback)  # noqa: E731
        model, route = request.model, "named"
        if not model:                         # the first configured model able to take the request
            model, route = first_usable(self.config.first_model), "default"
        if model == "auto":
            default = self.config.auto_default or self.config.first_model
            if not usable(default):           # the default unable (a chat request to a completions model): the first able
                default = first_usable(default)
            model, rule = select_model(self.config.auto_rules, default, request.text(), tier.name, usable)
            route = f"auto:{rule}"
        elif model in self.config.splits:
            split = self.config.splits[model]
            weights = {m: w for m, w in split.weights.items() if usable(m) and w > 0} or split.weights
            sticky = (key.key_id if split.sticky == "key" else
                      _conversation(request) if split.sticky == "conversation" else "")
            model, route = sticky_pick(weights, sticky), f"split:{model}"
        if model not in self.config.models:
            raise NotFoundError(f"unknown model {model!r}; ListModels lists the served models")
        if not key.allows(model):
            raise PermissionDeniedError(f"this API key may not use model {model!r}")
        if not self.config.tier_allows(tier.name, model):
            raise PermissionDeniedError(f"model {model!r} is not open to the {tier.name!r} tier")
        if not (request.prompt or request.messages):
            raise InvalidArgumentError("a prompt or at least one message is required")
        if not self.able(model, chat):
            raise InvalidArgumentError(f"model {model!r} has no chat template: it serves completions only "
                                       "(send a prompt, not messages)")
        if request.num_chars > self.config.max_prompt_chars:
            raise InvalidArgumentError(f"the prompt is longer than {self.config.max_prompt_chars} characters")
        for m in request.messages or ():
            if m.role not in ROLES:
                raise InvalidArgumentError(f"message role must be system, user, assistant or tool, not {m.role!r}")
        max_tokens = request.sampling.max_tokens
        if max_tokens is None:
            max_tokens = self.config.default_max_tokens
        if not 1 <= max_tokens <= self.config.max_tokens_limit:
            raise InvalidArgumentError(f"max_tokens must be in [1, {self.config.max_tokens_limit}]")
        if request.sampling.n is not None and not 1 <= request.sampling.n <= MAX_SAMPLES:
            raise InvalidArgumentError(f"n must be in [1, {MAX_SAMPLES}], got {request.sampling.n}")
        if request.sampling.logprobs is not None and self.config.redact_responses:
            raise InvalidArgumentError("logprobs are not served while answers are redacted (redact_responses): "
                                       "the tokens would carry what redaction hides")
        _check_user(request.user)
        return model, route, max_tokens

    def _shed(self, model: str, tier: TierSpec, span) -> None:
        """RESOURCE_EXHAUSTED with retry-after when the model's load passes the tier's thresholds."""
        state = self.directory.get(model) if self.directory is not None else None
        replicas = max(1, state.healthy) if state is not None else 1          # thresholds are per replica
        if state is None or not tier.sheds(state.waiting / replicas, state.pending_tokens / replicas,
                                           state.in_flight / replicas):
            return
        span.set_attribute("strata.shed", True)
        self.metrics.shed.labels(tier.name, model).inc()
        raise ShedError(f"model {model!r} is overloaded ({state.in_flight} requests in flight, {state.waiting} queued, "
                        f"{state.pending_tokens} tokens pending): {tier.name!r}-tier requests are refused until it "
                        "drains", retry_after_s=SHED_RETRY_AFTER_S)

    async def _check_budget(self, key: ApiKey) -> None:
        """The key's budget and its tenant's, each over its period: past the budget RESOURCE_EXHAUSTED naming
        it and when it resets; past its soft share a metric and (once a period) a log event."""
        try:
            tenant = await self.tenants.get(key.tenant) if self.tenants is not None else Budget()
            for scope, name, budget in (("key", key.key_id, Budget(key.budget_usd, key.budget_period)),
                                        ("tenant", key.tenant, tenant)):
                if budget.usd <= 0:
                    continue
                label, _ = period_of(budget.period)
                spent = await (self.usage.spend(name, label) if scope == "key" else self.usage.tenant_spend(name, label))
                if spent >= budget.usd:
                    raise exceeded(scope, name, budget, spent)
                if spent >= self.config.budget_soft_fraction * budget.usd:
                    self.metrics.budget_soft.labels(scope).inc()
                    if self._warned.get((scope, name)) != (label, budget):
                        self._warned[(scope, name)] = (label, budget)
                        log.warning("budget past its soft limit", extra={
                            "scope": scope, "id": name, "period": budget.period, "spent_usd": round(spent, 6),
                            "budget_usd": budget.usd, "soft_fraction": self.config.budget_soft_fraction})
        except REDIS_ERRORS:
            if self.config.limits_fail_open:
                return
            raise UnavailableError("cannot check the budget right now (store unreachable)") from None

    async def _reserve(self, key: ApiKey, tier: TierSpec, tokens: int) -> Reservation | None:
        own = key.limits                      # a key's own non-zero limits win over its tier's
        limits = Limits(own.requests_per_minute or tier.requests_per_minute, own.tokens_per_minute or tier.tokens_per_minute,
                        own.tokens_per_day or tier.tokens_per_day, own.concurrent_requests or tier.concurrent_requests)
        if limits == Limits():
            return None
        try:
            return await self.limiter.reserve(key.key_id, limits, tokens)
        except REDIS_ERRORS:
            if self.config.limits_fail_open:
                log.warning("limit store unreachable: admitting without limits (fail-open)")
                return None
            raise UnavailableError("cannot check rate limits right now (limit store unreachable)") from None


def _check_user(user: str) -> None:
    if len(user) > MAX_USER_CHARS or not user.isprintable():
        raise InvalidArgumentError(f"user must be at most {MAX_USER_CHARS} printable characters")


def _conversation(request: Request) -> str:
    """A conversation's sticky key: its first user message (a shared system prompt says nothing of which
    conversation it is), else its first message; a prompt's first 256 characters."""
    if request.messages:
        first = next((m for m in request.messages if m.role == "user"), request.messages[0])
        return f"{first.role}\n{first.content}"
    return request.prompt[:256]
