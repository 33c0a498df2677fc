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
    index: int = 0                               # the sample (SamplingParams.n > 1); request_id is the group's


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
    spec_drafts_total: int = 0                   # verification runs that carried proposals
    spec_draft_tokens_total: int = 0             # proposals verified
    spec_accepted_tokens_total: int = 0          # proposals accepted
    spec_emitted_tokens_total: int = 0           # tokens those runs produced (accepted + 1 each)
    spec_accepted_by_position: tuple[int, ...] = ()   # runs whose proposal i (0-based) was accepted
    steps_by_path: tuple[tuple[str, int], ...] = ()    # (compute path, model steps it ran) since start

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted_tokens_total / self.spec_draft_tokens_total if self.spec_draft_tokens_total else 0.0

    @property
    def spec_mean_tokens_per_step(self) -> float:
        """Tokens a request gets from one verification step (1 without speculation)."""
        return self.spec_emitted_tokens_total / self.spec_drafts_total if self.spec_drafts_total else 1.0
