"""The cache stage: look the admitted request up, replay a hit as a stream in word chunks, and store a
fresh answer (called by the settle stage)."""

from __future__ import annotations

import re
from typing import Iterator

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common import telemetry
from services.gateway.backends import Answer, Backends, CacheHit, CacheQuery
from services.gateway.stages.admit import Admission
from services.gateway.types import CachePolicy, Chunk, Finish, FinishReason, Source, SourceKind, Usage

_WORD = re.compile(r"\s*\S+\s*")
_LAYER = {SourceKind.CACHE_EXACT: "CACHE_LAYER_EXACT", SourceKind.CACHE_SEMANTIC: "CACHE_LAYER_SEMANTIC"}
_STORED = (FinishReason.STOP, FinishReason.LENGTH)


def cache_query(a: Admission) -> CacheQuery:
    r = a.request
    return CacheQuery(a.key.tenant, a.model, r.prompt, r.messages, r.sampling)


class CacheStage:
    def __init__(self, backends: Backends, tracer: trace.Tracer, replay_chunk_words: int) -> None:
        self.backends, self.tracer, self.replay_chunk_words = backends, tracer, replay_chunk_words

    async def lookup(self, a: Admission) -> CacheHit | None:
        """The cached answer, unless the request's policy skips the lookup or the cache has none."""
        if a.request.cache_policy is not CachePolicy.USE or not a.request.cacheable:
            return None
        with telemetry.child_span(self.tracer, "cache.lookup", kind=SpanKind.CLIENT) as span:
            hit = await self.backends.find(cache_query(a), a.request.allow_sampled_cache)
            span.set_attribute("strata.cache.hit", hit is not None)
            if hit is not None:
                span.set_attribute("strata.cache.layer", _LAYER[hit.kind])
        return hit

    def replay(self, hit: CacheHit, a: Admission) -> Iterator[Chunk]:
        """The cached answer in chunks of `replay_chunk_words` words; the last says where it came from."""
        text, n = hit.text, self.replay_chunk_words
        words = _WORD.findall(text) or [text]
        pieces = ["".join(words[i:i + n]) for i in range(0, len(words), n)]
        for piece in pieces[:-1]:
            yield Chunk(a.request_id, piece, ())
        finish = Finish(hit.finish_reason or FinishReason.STOP, Usage(),      # no model tokens were spent
                        Source(hit.kind, a.model, entry_id=hit.entry_id, route=a.route), a.flags)
        yield Chunk(a.request_id, pieces[-1], hit.token_ids, finish)

    async def store(self, a: Admission, answer: Answer) -> None:
        """Keep an answer that ended well (stop or length), unless the request's policy says not to."""
        if (a.request.cache_policy is CachePolicy.BYPASS or answer.finish_reason not in _STORED
                or not a.request.cacheable):
            return
        with telemetry.child_span(self.tracer, "cache.store", kind=SpanKind.CLIENT) as span:
            stored = await self.backends.store(cache_query(a), answer, a.request.allow_sampled_cache)
            span.set_attribute("strata.cache.stored", stored)
