"""What the engine hands back after each step (boundary dataclasses, no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]                     # tokens generated since the last output
    text: str                                    # text delta (complete UTF-8 characters only)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None             # "stop", "length", "abort", "error" when finished
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0                   # prompt tokens that were prefix-cache hits
    error: str | None = None
    first_scheduled_time: float | None = None    # time.monotonic() when first put in a batch


@dataclass(slots=True, frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_pending_tokens: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    num_preemptions_total: int
    prefix_cache_hit_tokens_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
