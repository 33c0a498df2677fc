"""Per-request sampling parameters and their validation.

`SamplingParams` is the domain form of what a client asks for; the gRPC servicer translates the
protobuf message into it and calls `validate(vocab_size)` before the request reaches the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Temperatures below this are treated as greedy (dividing by them would only amplify noise).
GREEDY_TEMPERATURE_EPS = 1e-5

MAX_TEMPERATURE = 10.0
MAX_REPETITION_PENALTY = 10.0
MAX_ABS_PRESENCE_OR_FREQUENCY_PENALTY = 2.0
MAX_NUM_LOGPROBS = 20
MAX_N = 16                       # samples of one prompt (they share its KV blocks)
MAX_NUM_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_NUM_STOP_TOKEN_IDS = 64
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

FORMAT_KINDS = ("json_object", "json_schema", "regex", "grammar", "structural_tag")   # the last: tool calling's
# JSON may be laid out as the model likes (so that a conforming free answer is also the constrained one), but
# a run of whitespace is bounded: a small model can otherwise emit newlines until max_tokens
MAX_JSON_WHITESPACE = 16
MAX_SPEC_CHARS = 64 * 1024       # a schema, regex or grammar longer than this is refused


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What the answer must be: `kind` one of FORMAT_KINDS; `spec` the JSON Schema (JSON text), regex or EBNF
    grammar (empty for json_object); `strict`: a JSON schema's unnamed properties and items are refused (else
    allowed where the schema does not say, as JSON Schema reads it)."""

    kind: str
    spec: str = ""
    strict: bool = False

    def validate(self) -> None:
        if self.kind not in FORMAT_KINDS:
            raise ValueError(f"response_format must be one of {', '.join(FORMAT_KINDS)}, got {self.kind!r}")
        if self.kind == "json_object":
            if self.spec:
                raise ValueError("response_format json_object takes no spec")
        elif not self.spec:
            raise ValueError(f"response_format {self.kind} needs its spec (the schema, regex or grammar)")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"response_format spec is longer than {MAX_SPEC_CHARS} characters")


@dataclass(slots=True, frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = disabled
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 = disabled
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob; 0 = disabled
    repetition_penalty: float = 1.0  # tokens in prompt or output: logit > 0 -> /p, else *p
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token in the output
    seed: int | None = None  # None = nondeterministic
    max_tokens: int | None = None  # None = the rest of the context window (engine decides)
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens are out
    stop: tuple[str, ...] = ()  # stop strings, not included in the output text
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides EOS
    ignore_eos: bool = False  # keep generating past EOS
    logprobs: int | None = None  # None = no logprobs; n = sampled token's plus the top n
    response_format: ResponseFormat | None = None  # structured output (sampling/structured.py); None = free text
    n: int = 1  # samples of the prompt: they share its KV blocks; with a seed, sample i draws from seed + i

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def plain_argmax(self) -> bool:
        """Greedy with nothing that changes the logits or asks for more than the token (no penalties, no
        logprobs): the token is the argmax of the raw logits. min_tokens still bans EOS; the runner checks it."""
        return (self.temperature < GREEDY_TEMPERATURE_EPS and self.repetition_penalty == 1.0
                and self.presence_penalty == 0.0 and self.frequency_penalty == 0.0 and self.logprobs is None)

    def validate(self, vocab_size: int) -> None:
        """Raises ValueError naming the first field that is out of range."""
        _check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check_int("top_k", self.top_k, 0, vocab_size)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float(
            "repetition_penalty",
            self.repetition_penalty,
            0.0,
            MAX_REPETITION_PENALTY,
            low_open=True,
        )
        bound = MAX_ABS_PRESENCE_OR_FREQUENCY_PENALTY
        _check_float("presence_penalty", self.presence_penalty, -bound, bound)
        _check_float("frequency_penalty", self.frequency_penalty, -bound, bound)
        if self.seed is not None:
            _check_int("seed", self.seed, _INT64_MIN, _INT64_MAX)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, None)
        _check_int("min_tokens", self.min_tokens, 0, None)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        _check_stop(self.stop)
        _check_stop_token_ids(self.stop_token_ids, vocab_size)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_NUM_LOGPROBS)
        _check_int("n", self.n, 1, MAX_N)
        if self.response_format is not None:
            self.response_format.validate()
            if self.ignore_eos or self.min_tokens:
                raise ValueError("ignore_eos and min_tokens cannot be combined with a response_format: the answer "
                                 "ends with EOS once the format is complete")


def _check_float(
    name: str, value: float, low: float, high: float, *, low_open: bool = False
) -> None:
    left = "(" if low_open else "["
    allowed = f"{left}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in {allowed}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite and in {allowed}, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")


def _check_int(name: str, value: int, low: int, high: int | None) -> None:
    allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_stop(stop: tuple[str, ...]) -> None:
    if len(stop) > MAX_NUM_STOP_STRINGS:
        raise ValueError(f"stop allows at most {MAX_NUM_STOP_STRINGS} strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_STRING_CHARS:
            raise ValueError(
                f"stop strings must be non-empty and at most {MAX_STOP_STRING_CHARS} characters, "
                f"got {s!r:.300}"
            )


def _check_stop_token_ids(stop_token_ids: tuple[int, ...], vocab_size: int) -> None:
    if len(stop_token_ids) > MAX_NUM_STOP_TOKEN_IDS:
        raise ValueError(
            f"stop_token_ids allows at most {MAX_NUM_STOP_TOKEN_IDS} ids, got {len(stop_token_ids)}"
        )
    for token_id in stop_token_ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise ValueError(f"stop_token_ids must hold integers, got {token_id!r}")
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"stop_token_ids must be in [0, {vocab_size}), got {token_id}")
