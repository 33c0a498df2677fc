"""The gateway's own request and answer types: what a front door (the gRPC servicer today, an HTTP one
later) fills and reads. No protobuf here; the servicer and the downstream adapter translate.

Presence is kept: a sampling field left unset is None, never its default, because the cache keys and
the engine tell "unset" from 0 (max_tokens, seed, logprobs...).

These are built for every request and every chunk, so they are plain slots dataclasses (a frozen one's
__init__ costs about four times as much: one object.__setattr__ a field). Treat them as values: a stage
that changes one makes a new one. Sampling is frozen: the gRPC edges translate each one once and
remember it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence


class CachePolicy(enum.StrEnum):
    USE = "use"               # look up, store on a miss
    BYPASS = "bypass"         # neither look up nor store
    REFRESH = "refresh"       # skip the lookup, store the fresh answer


class FinishReason(enum.StrEnum):
    STOP = "stop"             # EOS, a stop token or a stop string
    LENGTH = "length"         # max_tokens or the context window
    ABORT = "abort"           # cancelled by the caller or its deadline
    ERROR = "error"           # failed inside the server
    TOOL_CALLS = "tool_calls" # ended after calling tools


class SourceKind(enum.StrEnum):
    """Where an answer came from; the values are the `source` label of the gateway's metrics."""

    MODEL = "model"
    CACHE_EXACT = "cache_exact"
    CACHE_SEMANTIC = "cache_semantic"
    NONE = "none"             # a downstream that did not say


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str            # JSON text


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = ""      # the arguments' JSON Schema, as JSON text ("" = none)


@dataclass(frozen=True, slots=True)
class Tools:
    """The functions a conversation offers the model, and how it may use them (the replica renders, constrains
    and parses; services/inference/tools.py)."""

    tools: tuple[Tool, ...]
    choice: str = "auto"      # auto | none | required | function
    function: str = ""        # choice "function": its name
    parallel: bool | None = None   # None: the default (several calls allowed)


@dataclass(slots=True)
class Message:
    role: str                 # "system", "user", "assistant" or "tool" (checked at admission)
    content: str
    tool_calls: tuple[ToolCall, ...] = ()   # assistant: the calls it made
    tool_call_id: str = ""    # tool: the call this is the result of


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Structured output: the answer is constrained to `kind` ("json_object", "json_schema", "regex" or
    "grammar"); `spec` is the schema (JSON text), regex or EBNF grammar; the replica compiles and checks it."""

    kind: str
    spec: str = ""
    strict: bool = False


@dataclass(slots=True, frozen=True)
class Sampling:
    """Sampling parameters, named as in vLLM / OpenAI; None = unset (the engine's documented default)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None         # unset: the gateway's default_max_tokens
    min_tokens: int | None = None
    stop: tuple[str, ...] = ()            # stop strings
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None           # top-n log-probabilities per token; unset = none
    response_format: ResponseFormat | None = None   # structured output; None = free text
    n: int | None = None                  # samples of the prompt (1..16); unset = 1


@dataclass(slots=True)
class Request:
    """One question to the gateway: a prompt, or chat messages (`messages` not None)."""

    model: str = ""                                 # a configured model, "auto" (rules pick), "" = the first one
    prompt: str = ""                                # raw text, when messages is None
    messages: tuple[Message, ...] | None = None     # chat input instead of a prompt
    sampling: Sampling = Sampling()
    cache_policy: CachePolicy = CachePolicy.USE
    priority: int = 0                               # lower = sooner, passed down to the engine
    allow_sampled_cache: bool = False               # also cache / serve from cache when temperature > 0
    tools: Tools | None = None                      # chat only: functions the model may call
    user: str = ""                                  # the caller's end user: usage is also counted per user

    @property
    def uses_tools(self) -> bool:
        """Tools offered, or calls and their results in the history."""
        return self.tools is not None or any(m.tool_calls or m.role == "tool" for m in self.messages or ())

    @property
    def samples(self) -> int:
        return self.sampling.n or 1

    @property
    def cacheable(self) -> bool:
        """Whether the cache may answer or keep it: not with tools (calls are not cached), per-token
        logprobs (a cached answer has none) or several samples."""
        return not self.uses_tools and self.sampling.logprobs is None and self.samples == 1

    def text(self, role: str | None = None) -> str:
        """The prompt, or the messages' contents (of `role` only, when given) joined by newlines."""
        if self.messages is None:
            return self.prompt
        return "\n".join(m.content for m in self.messages if role is None or m.role == role)

    @property
    def num_chars(self) -> int:
        if self.messages is None:
            return len(self.prompt)
        return sum(len(m.content) for m in self.messages)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0            # 0 for an answer served from the cache
    cached_prompt_tokens: int = 0         # prompt tokens served from the replica's prefix cache


@dataclass(slots=True)
class Source:
    kind: SourceKind
    model: str = ""
    replica: str = ""                     # inference replica id (MODEL)
    entry_id: str = ""                    # cache entry id (CACHE_*)
    route: str = ""                       # how the gateway chose the model (named, default, auto:<rule>, ...)


@dataclass(slots=True)
class Finish:
    """How an answer ended: carried by its last chunk only."""

    reason: FinishReason
    usage: Usage
    source: Source
    flags: tuple[str, ...] = ()           # guardrail findings, e.g. "pii:EMAIL", "injection:ignore_instructions"
    mean_logprob: float | None = None     # mean token log-probability, when the gateway asked for it (cascades)


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    token: bytes                          # the bytes the token stands for
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability (the model's raw distribution) and the top tokens at its place."""

    token_id: int
    token: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(slots=True)
class Chunk:
    """A piece of a streamed answer. With n > 1 samples, each sample's last chunk has its finish (reason;
    usage is the request's so far), and the stream's last chunk has the whole request's usage."""

    request_id: str
    text: str
    token_ids: Sequence[int]
    finish: Finish | None = None          # the last chunk (of its sample) only
    tool_calls: tuple[ToolCall, ...] = () # calls completed in this chunk (their text is not in `text`)
    logprobs: Sequence[TokenLogprob] = () # one per token, when the request asked for them
    index: int = 0                        # the sample (n > 1)


@dataclass(slots=True)
class Choice:
    """One sample of a whole answer."""

    index: int
    text: str
    token_ids: Sequence[int]
    reason: FinishReason
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: Sequence[TokenLogprob] = ()


@dataclass(slots=True)
class Result:
    """A whole answer (unary): sample 0's fields, and every sample in `choices` (one for n = 1)."""

    request_id: str
    text: str
    token_ids: Sequence[int]
    finish: Finish                        # sample 0's reason; the request's usage, source and every sample's flags
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: Sequence[TokenLogprob] = ()
    choices: tuple[Choice, ...] = ()
