"""The admit stage: API key → validation (`auto` resolved) → guardrails → budget → limits reserved
(estimated prompt + max_tokens). What it returns is all a later stage may use of the request."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from opentelemetry import trace

from services.common import telemetry
from services.common.errors import InvalidArgumentError, PermissionDeniedError, ResourceExhaustedError, UnavailableError
from services.common.metrics import GatewayMetrics
from services.gateway.config import GatewayConfig
from services.gateway.errors import REDIS_ERRORS
from services.gateway.keys import ApiKey
from services.gateway.limits import Limits, RateLimiter, Reservation
from services.gateway.selection import select_model
from services.gateway.stages.auth import Authenticator
from services.gateway.stages.guard import Guard
from services.gateway.types import Request
from services.gateway.usage import UsageStore

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")


@dataclass(slots=True)
class Admission:
    """A request let in (a value: built once, never changed)."""

    request_id: str
    request: Request                  # guarded: PII redacted, so nothing after admission sees the original
    key: ApiKey
    model: str                        # resolved: a configured model the key may use
    max_tokens: int                   # resolved: the request's, or the default
    flags: tuple[str, ...]            # guardrail findings
    reservation: Reservation | None   # None: the key has no limits, or the limit store was away (fail-open)


class Admit:
    def __init__(self, config: GatewayConfig, auth: Authenticator, guard: Guard, limiter: RateLimiter,
                 usage: UsageStore, tracer: trace.Tracer, metrics: GatewayMetrics) -> None:
        self.config, self.auth, self.guard, self.limiter, self.usage = config, auth, guard, limiter, usage
        self.tracer, self.metrics = tracer, metrics

    async def __call__(self, request: Request, bearer: str, client: str) -> Admission:
        with telemetry.child_span(self.tracer, "auth") as span:
            key = await self.auth.authenticate(bearer, client)
            span.set_attribute("strata.key_id", key.key_id)
        with telemetry.child_span(self.tracer, "guardrails") as span:
            model, max_tokens = self._validate(request, key)
            request, flags = await self.guard(request)
            span.set_attributes({"strata.model": model, "strata.flags": flags})
            for f in flags:
                self.metrics.guardrails.labels(f).inc()
        with telemetry.child_span(self.tracer, "limits") as span:
            await self._check_budget(key)
            tokens = request.num_chars // 4 + 1 + max_tokens      # estimated prompt tokens + max_tokens
            span.set_attribute("strata.reserved_tokens", tokens)
            reservation = await self._reserve(key, tokens)
        return Admission(uuid.uuid4().hex, request, key, model, max_tokens, tuple(flags), reservation)

    def _validate(self, request: Request, key: ApiKey) -> tuple[str, int]:
        model = request.model or self.config.first_model
        if model == "auto":
            model = select_model(self.config.auto_rules, self.config.auto_default or self.config.first_model,
                                 request.text(), key.tier)
        if model not in self.config.models:
            raise InvalidArgumentError(f"unknown model {model!r}; ListModels lists the served models")
        if not key.allows(model):
            raise PermissionDeniedError(f"this API key may not use model {model!r}")
        if not (request.prompt or request.messages):
            raise InvalidArgumentError("a prompt or at least one message is required")
        if request.num_chars > self.config.max_prompt_chars:
            raise InvalidArgumentError(f"the prompt is longer than {self.config.max_prompt_chars} characters")
        for m in request.messages or ():
            if m.role not in ROLES:
                raise InvalidArgumentError(f"message role must be system, user or assistant, not {m.role!r}")
        max_tokens = request.sampling.max_tokens
        if max_tokens is None:
            max_tokens = self.config.default_max_tokens
        if not 1 <= max_tokens <= self.config.max_tokens_limit:
            raise InvalidArgumentError(f"max_tokens must be in [1, {self.config.max_tokens_limit}]")
        return model, max_tokens

    async def _check_budget(self, key: ApiKey) -> None:
        if key.budget_usd <= 0:
            return
        try:
            spent = await self.usage.total_spend(key.key_id)
        except REDIS_ERRORS:
            if self.config.limits_fail_open:
                return
            raise UnavailableError("cannot check the budget right now (store unreachable)") from None
        if spent >= key.budget_usd:
            raise ResourceExhaustedError(f"the key's budget of ${key.budget_usd:.2f} is spent (${spent:.4f})")

    async def _reserve(self, key: ApiKey, tokens: int) -> Reservation | None:
        if key.limits == Limits():
            return None
        try:
            return await self.limiter.reserve(key.key_id, key.limits, tokens)
        except REDIS_ERRORS:
            if self.config.limits_fail_open:
                log.warning("limit store unreachable: admitting without limits (fail-open)")
                return None
            raise UnavailableError("cannot check rate limits right now (limit store unreachable)") from None

