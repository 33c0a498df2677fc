"""One request's state inside the engine (scheduler and output processing read and write it)."""

from __future__ import annotations

import enum
import itertools
import time

from services.inference.engine.block_pool import BlockHash
from services.inference.sampling import SamplingParams
from services.inference.spec_decode.policy import AcceptanceEstimate

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


class Request:
    """Tokens, progress and KV blocks of one generation request."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, priority: int = 0, eos_token_id: int | None = None,
                 num_speculative_tokens: int | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.max_tokens = max_tokens               # resolved: never None here
        self.priority = priority                   # lower value = scheduled first
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic()
        self.arrival_seq = next(_arrival_counter)  # tie-break: earlier first
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0               # tokens whose K/V are in the cache
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first schedule
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.block_tables: list[list[int]] = [[]]  # per layer group (engine/kv_layout.py); one for most models
        self.num_released_blocks: list[int] = []   # per group: leading entries a sliding window has released
        self.block_hashes: list[BlockHash] = []    # hashes of this request's full blocks, in order
        self.num_registered_blocks = 0             # leading blocks already in the prefix-cache index
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        # speculative decoding: None = the engine's default k, 0 = off for this request
        self.num_speculative_tokens = num_speculative_tokens
        self.spec_token_ids: list[int] = []        # proposals for the next step (not yet verified)
        self.acceptance = AcceptanceEstimate()     # how often its proposals are accepted (picks its k)
        self.matcher = None                        # structured output: its xgrammar matcher (None = free text)
        # several samples of one prompt (SamplingParams.n): each is a Request; the first (index 0) computes the
        # prompt and holds the others in `forks` until then (LLMEngine._fork), when they take its blocks
        self.group_id = request_id                 # what the caller knows the request by (outputs carry it)
        self.index = 0
        self.forks: list[Request] = []

    @property
    def block_ids(self) -> list[int]:
        """The first (full-attention) group's block table: every layer's, unless the model has local layers."""
        return self.block_tables[0]

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival_seq)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to compute: prompt not yet in the cache plus outputs still to generate (and the forks'
        answers, while they wait on this request's prompt)."""
        own = (self.num_tokens - self.num_computed_tokens) + (self.max_tokens - self.num_output_tokens)
        return own + len(self.forks) * self.max_tokens

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
