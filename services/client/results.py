"""What a call returns: frozen dataclasses built from the gateway's protobuf answers."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.pb import common_pb2, gateway_pb2


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int           # 0 for an answer served from the cache
    cached_prompt_tokens: int        # prompt tokens served from the inference replica's prefix cache


@dataclass(slots=True, frozen=True)
class Source:
    kind: str                        # "model", "cache_exact" or "cache_semantic"
    model: str
    replica: str                     # inference replica id (kind "model"), else ""
    entry_id: str                    # cache entry id (kind "cache_*"), else ""
    route: str = ""                  # how the gateway chose the model: named, default, auto:<rule>, split:<name>,
                                     # cascade:<first model>; " fallback:<model>" when the router fell back


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """A generated token's log-probability, its bytes, and the top (token id, bytes, logprob) at its place."""
    token_id: int
    token: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass(slots=True, frozen=True)
class Choice:
    """One sample of an answer asked for with n > 1."""
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(slots=True, frozen=True)
class Result:
    """A whole answer (`generate`): with n > 1, sample 0's text and every sample in `choices`."""
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str               # "stop", "length", "abort" or "error"
    usage: Usage
    source: Source
    flags: tuple[str, ...]           # guardrail findings, e.g. "pii:EMAIL", "injection:similar"
    mean_logprob: float | None       # only when the gateway computed it (cascades)
    logprobs: tuple[TokenLogprob, ...] = ()   # when asked for (logprobs=...)
    choices: tuple[Choice, ...] = ()          # n > 1 only


@dataclass(slots=True, frozen=True)
class Chunk:
    """A piece of a streamed answer (`stream`); the last one also says how and why it ended."""
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None     # set on the last chunk only, as are usage, source and flags
    usage: Usage | None = None
    source: Source | None = None
    flags: tuple[str, ...] = ()
    mean_logprob: float | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0                       # the sample (n > 1); each sample's last chunk has its finish_reason


def _logprobs(lps) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(lp.token_id, lp.token, lp.logprob, tuple((t.token_id, t.token, t.logprob) for t in lp.top))
                 for lp in lps)


def _finish_reason(value: int) -> str | None:
    if value == common_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _usage(u: common_pb2.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)


def _source(s: common_pb2.Source) -> Source:
    return Source(common_pb2.Source.Kind.Name(s.kind).removeprefix("KIND_").lower(), s.model, s.replica, s.entry_id, s.route)


def result_from_proto(r: gateway_pb2.GatewayResponse) -> Result:
    return Result(r.request_id, r.text, tuple(r.token_ids), _finish_reason(r.finish_reason) or "unspecified",
                  _usage(r.usage), _source(r.source), tuple(r.flags),
                  r.mean_logprob if r.HasField("mean_logprob") else None, _logprobs(r.logprobs),
                  tuple(Choice(c.index, c.text, tuple(c.token_ids), _finish_reason(c.finish_reason) or "unspecified",
                               _logprobs(c.logprobs)) for c in r.choices))


def chunk_from_proto(c: gateway_pb2.GatewayChunk) -> Chunk:
    return Chunk(c.request_id, c.text, tuple(c.token_ids), _finish_reason(c.finish_reason),
                 _usage(c.usage) if c.HasField("usage") else None,
                 _source(c.source) if c.HasField("source") else None, tuple(c.flags),
                 c.mean_logprob if c.HasField("mean_logprob") else None, _logprobs(c.logprobs), c.index)
