"""What the pipeline asks of the services behind it, in its own types: the semantic cache (find, store)
and the router (generate). `clients.Downstream` does it over gRPC; a test may do it in memory.

A cache that fails is a miss (find) or a skipped store, never an error for the caller; router failures
arrive as domain errors (services.common.errors) carrying the router's status. The types are values
built per request and chunk (plain slots dataclasses, as in services.gateway.types)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol, Sequence

import numpy as np

from services.gateway.types import (Finish, FinishReason, Message, Sampling, SourceKind, TokenLogprob, ToolCall, Tools,
                                    Usage)


@dataclass(slots=True)
class CacheQuery:
    """What the cache keys an answer by (it computes the keys itself from these fields)."""

    namespace: str                        # the key's tenant
    model: str
    prompt: str
    messages: tuple[Message, ...] | None  # instead of the prompt
    sampling: Sampling                    # as the caller gave it (presence matters to the key)


@dataclass(slots=True)
class Answer:
    """A whole answer, for the cache to keep."""

    text: str
    token_ids: Sequence[int]
    usage: Usage                          # of the model call
    finish_reason: FinishReason


@dataclass(slots=True)
class CacheHit:
    kind: SourceKind                      # CACHE_EXACT or CACHE_SEMANTIC
    entry_id: str
    text: str
    token_ids: Sequence[int]
    finish_reason: FinishReason | None    # None: the storer did not say


@dataclass(slots=True)
class ModelRequest:
    request_id: str
    model: str
    prompt: str
    messages: tuple[Message, ...] | None  # instead of the prompt
    sampling: Sampling                    # max_tokens always set
    priority: int
    tools: Tools | None = None            # chat only: the functions the model may call


@dataclass(slots=True)
class ModelChunk:
    """One piece of the router's stream."""

    text: str
    token_ids: Sequence[int]
    prompt_tokens: int                    # the prompt's length in tokens, on the first chunk (else 0)
    logprobs: Sequence[TokenLogprob]      # one per token, when asked for
    finish: Finish | None                 # the last chunk (of its sample) only: reason, usage (the prompt and
                                          # this sample's completion tokens) and source (no flags)
    tool_calls: tuple[ToolCall, ...] = () # calls completed in this chunk
    index: int = 0                        # the sample (n > 1)


@dataclass(slots=True)
class Embedded:
    """Texts' embeddings as the cache's model made them."""

    model: str
    vectors: np.ndarray                   # [n, dim] float32, unit rows, in the texts' order
    tokens: Sequence[int]                 # tokens the model read of each text


class Backends(Protocol):
    async def find(self, query: CacheQuery, allow_sampled: bool) -> CacheHit | None:
        """A cached answer, or None (a miss, or the cache failed or is not configured)."""

    async def store(self, query: CacheQuery, answer: Answer, allow_sampled: bool) -> bool:
        """Whether the cache kept the answer."""

    def generate(self, request: ModelRequest, timeout_s: float | None) -> AsyncIterator[ModelChunk]:
        """The model's answer as the router streams it."""

    async def embed(self, texts: Sequence[str], truncate: bool, timeout_s: float | None) -> Embedded:
        """The texts' embeddings from the cache's model (UNAVAILABLE when no cache is configured; the cache's
        own status otherwise, e.g. INVALID_ARGUMENT for a text past the model's window)."""
