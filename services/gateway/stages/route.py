"""The route stage: the admitted request to the router, its stream back as the gateway's chunks (or, when
answers are redacted too, as one chunk at the end), and a tally of what it produced for settlement."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Collection

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common import telemetry
from services.common.errors import UnavailableError
from services.gateway.backends import Answer, Backends, ModelRequest
from services.gateway.guardrails import redact
from services.gateway.stages.admit import Admission
from services.gateway.types import Chunk, Finish, ToolCall, Usage


@dataclass(slots=True)
class Generation:
    """The model's answer as it streams in: what settlement charges and the cache keeps. With n > 1 samples
    the prompt is counted once and every sample's completion tokens."""

    samples: int = 1                      # the request's n: the answer is whole once each has finished
    prompt_tokens: int = 0                # consumed so far: charged when the stream is cut short
    completion_tokens: int = 0
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprob_sum: float = 0.0
    logprob_count: int = 0
    finished: int = 0                     # samples finished
    finished_tokens: int = 0              # their completion tokens, as the replica counted them
    cached_tokens: int = 0
    finish: Finish | None = None          # the router's last chunk: reason, usage (the request's), source

    @property
    def final(self) -> Finish:
        if self.finish is None or self.finished < self.samples:
            raise UnavailableError("the answer ended without its final chunk")
        return self.finish

    @property
    def mean_logprob(self) -> float | None:
        return self.logprob_sum / self.logprob_count if self.logprob_count else None

    def answer(self) -> Answer:
        final = self.final
        return Answer("".join(self.text), self.token_ids, final.usage, final.reason)

    def ended(self, finish: Finish) -> Finish:
        """A sample's last chunk: its finish, with the request's usage so far."""
        self.finished += 1
        self.finished_tokens += finish.usage.completion_tokens
        self.prompt_tokens = finish.usage.prompt_tokens
        self.cached_tokens = max(self.cached_tokens, finish.usage.cached_prompt_tokens)
        self.finish = replace(finish, usage=Usage(self.prompt_tokens, self.finished_tokens, self.cached_tokens))
        return self.finish


class Route:
    def __init__(self, backends: Backends, tracer: trace.Tracer, cascades: Collection[str],
                 redact_responses: bool) -> None:
        self.backends, self.tracer = backends, tracer
        self.cascades = cascades                  # models whose answers a cascade may re-ask
        self.redact_responses = redact_responses

    async def stream(self, a: Admission, gen: Generation, timeout_s: float | None) -> AsyncIterator[Chunk]:
        """The answer's chunks; `gen` tallies them. Ends with the final chunk or raises."""
        sampling = a.request.sampling
        logprobs = sampling.logprobs
        asked = logprobs is not None              # the caller's: passed on (else only the cascade's mean is)
        if a.model in self.cascades and logprobs is None:
            logprobs = 0                          # the chosen tokens' log-probabilities, for the cascade
        request = ModelRequest(a.request_id, a.model, a.request.prompt, a.request.messages,
                               replace(sampling, max_tokens=a.max_tokens, logprobs=logprobs), a.priority,
                               a.request.tools)
        gen.samples = a.request.samples
        route = telemetry.child_span(self.tracer, "router.generate", kind=SpanKind.CLIENT,
                                     attributes={"strata.model": a.model, "strata.route": a.route,
                                                 "strata.request_id": a.request_id})
        held: dict[int, Chunk] = {}               # answers redacted: each sample's whole answer, sent at its end
        with route as span:
            async for c in self.backends.generate(request, timeout_s):
                gen.prompt_tokens = gen.prompt_tokens or c.prompt_tokens
                gen.completion_tokens += len(c.token_ids)
                gen.text.append(c.text)
                gen.token_ids.extend(c.token_ids)
                gen.tool_calls.extend(c.tool_calls)
                if c.logprobs:
                    gen.logprob_sum += sum(lp.logprob for lp in c.logprobs)
                    gen.logprob_count += len(c.logprobs)
                finish = c.finish
                if finish is not None:
                    finish = replace(gen.ended(finish), flags=a.flags, mean_logprob=gen.mean_logprob,
                                     source=replace(finish.source, route=route_of(a, finish.source.model)))
                chunk = Chunk(a.request_id, c.text, c.token_ids, finish, c.tool_calls, c.logprobs if asked else (),
                              c.index)
                if not self.redact_responses:
                    yield chunk
                    continue
                whole = held.get(c.index)
                held[c.index] = chunk if whole is None else Chunk(
                    a.request_id, whole.text + c.text, [*whole.token_ids, *c.token_ids], finish,
                    whole.tool_calls + c.tool_calls, (), c.index)
                if finish is not None:
                    yield self._redacted(a, held.pop(c.index))
            if gen.finish is not None:
                span.set_attribute("strata.replica", gen.finish.source.replica)
        if gen.finish is None or gen.finished < gen.samples:
            raise UnavailableError("the answer ended without its final chunk")

    @staticmethod
    def _redacted(a: Admission, whole: Chunk) -> Chunk:
        red = redact(whole.text)
        flags = whole.finish.flags + tuple(f"pii_out:{k}" for k in red.found)
        return replace(whole, text=red.text, finish=replace(whole.finish, flags=flags))


def route_of(a: Admission, answered_by: str) -> str:
    """How the answering model was chosen: the admission's route, and the router's fallback when it answered."""
    return a.route if not answered_by or answered_by == a.model else f"{a.route} fallback:{answered_by}"
