"""Guardrails for the admit stage: PII redacted (or the request refused), then the injection screen,
by rules and, when configured, by embedding similarity to known attacks. Everything after sees only
the redacted request."""

from __future__ import annotations

from dataclasses import replace

from services.common.errors import InvalidArgumentError, PermissionDeniedError
from services.gateway.config import GatewayConfig
from services.gateway.guardrails import InjectionSimilarity, redact, screen_injection
from services.gateway.types import Request


class Guard:
    def __init__(self, config: GatewayConfig, similarity: InjectionSimilarity | None = None) -> None:
        self.config, self.similarity = config, similarity

    async def __call__(self, request: Request) -> tuple[Request, list[str]]:
        """The request with its personal data redacted, and the findings as flags ("pii:EMAIL",
        "injection:ignore_instructions", "injection:similar")."""
        request, flags = self._screen(request)
        flags += await self._screen_similar(request)
        return request, flags

    def _screen(self, request: Request) -> tuple[Request, list[str]]:
        flags: list[str] = []
        if self.config.pii_mode != "off":
            found: dict[str, int] = {}
            if request.messages is not None:
                messages = []
                for m in request.messages:
                    r = redact(m.content)
                    messages.append(replace(m, content=r.text) if r.found else m)
                    for k, n in r.found.items():
                        found[k] = found.get(k, 0) + n
                if found:                 # (redaction changes a text only where it finds something)
                    request = replace(request, messages=tuple(messages))
            else:
                r = redact(request.prompt)
                found = dict(r.found)
                if found:
                    request = replace(request, prompt=r.text)
            if found and self.config.pii_mode == "block":
                raise InvalidArgumentError(f"the request contains personal data ({', '.join(sorted(found))}); "
                                           "this gateway refuses it instead of redacting")
            flags += [f"pii:{k}" for k in sorted(found)]
        if self.config.injection_mode != "allow":
            screen = screen_injection(request.text("user"))
            if screen.flagged and self.config.injection_mode == "block":
                raise PermissionDeniedError(f"the request looks like a prompt injection ({', '.join(screen.rules)})")
            flags += [f"injection:{r}" for r in screen.rules]
        return request, flags

    async def _screen_similar(self, request: Request) -> list[str]:
        if self.similarity is None or self.config.injection_mode == "allow":
            return []
        score = await self.similarity.score(request.text("user"))
        if score < self.similarity.threshold:
            return []
        if self.config.injection_mode == "block":
            raise PermissionDeniedError(f"the request looks like a prompt injection (similar to a known attack, {score:.2f})")
        return ["injection:similar"]
