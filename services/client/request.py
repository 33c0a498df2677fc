"""From a call's Python arguments to a GatewayRequest: prompt or messages, sampling, cache policy."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Literal, TypedDict

from services.common.pb import common_pb2, gateway_pb2

Message = Mapping[str, str] | tuple[str, str]     # {"role": "user", "content": "Hi"} or ("user", "Hi")
Prompt = str | Sequence[Message]                  # raw text, or a conversation (the model's chat template applies)
CachePolicy = Literal["use", "bypass", "refresh"]

CACHE_POLICIES: dict[str, int] = {
    "use": common_pb2.CACHE_POLICY_USE,           # look up, store on a miss
    "bypass": common_pb2.CACHE_POLICY_BYPASS,     # neither look up nor store
    "refresh": common_pb2.CACHE_POLICY_REFRESH,   # skip the lookup, store the fresh answer
}


class Sampling(TypedDict, total=False):
    """Sampling keyword arguments, as in common.proto's SamplingParams; unset ones take the server's default."""
    temperature: float              # 1.0; 0 = greedy
    top_k: int                      # 0 = off
    top_p: float                    # 1.0
    min_p: float                    # 0.0
    repetition_penalty: float       # 1.0
    presence_penalty: float         # 0.0
    frequency_penalty: float        # 0.0
    seed: int                       # random
    max_tokens: int                 # the rest of the context window (the gateway may cap it)
    min_tokens: int                 # 0
    stop: str | Sequence[str]       # stop strings, left out of the text
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    logprobs: int                   # top-n per token, 0..20 (Result.logprobs / Chunk.logprobs)
    n: int                          # samples of the prompt, 1..16 (Result.choices / Chunk.index)
    response_format: str | Mapping[str, object]   # structured output: "json_object", or {"type": "json_schema",
    # "schema": {...} or its JSON text, "strict": bool}, {"type": "regex", "regex": ...}, {"type": "grammar",
    # "grammar": "root ::= ..."}; OpenAI's {"type": "json_schema", "json_schema": {"schema": ...}} too


SAMPLING_FIELDS = frozenset(Sampling.__annotations__)
_FORMAT = common_pb2.ResponseFormat


def response_format(value: object) -> common_pb2.ResponseFormat:
    """The ResponseFormat message of a `response_format` argument (see Sampling); ValueError if malformed."""
    if value in ("json_object", {"type": "json_object"}):
        return _FORMAT(type=_FORMAT.TYPE_JSON_OBJECT)
    if value in ("text", {"type": "text"}):
        return _FORMAT(type=_FORMAT.TYPE_TEXT)
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "json_schema":
        inner = value.get("json_schema", value)
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        if isinstance(schema, Mapping):
            schema = json.dumps(schema)
        if isinstance(schema, str):
            return _FORMAT(type=_FORMAT.TYPE_JSON_SCHEMA, spec=schema, strict=bool(inner.get("strict", False)))
    if kind in ("regex", "grammar") and isinstance(value.get(kind), str):
        return _FORMAT(type=_FORMAT.TYPE_REGEX if kind == "regex" else _FORMAT.TYPE_GRAMMAR, spec=value[kind])
    raise ValueError(f"response_format must be 'json_object' or a json_schema, regex or grammar mapping, not {value!r:.200}")


def sampling_params(sampling: Mapping[str, object]) -> common_pb2.SamplingParams:
    """SamplingParams with exactly the fields the caller passed (so the server's defaults apply to the rest)."""
    unknown = sorted(set(sampling) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(SAMPLING_FIELDS))}")
    fields = dict(sampling)
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    if "response_format" in fields:
        fields["response_format"] = response_format(fields["response_format"])
    return common_pb2.SamplingParams(**fields)


def chat_messages(messages: Sequence[Message]) -> common_pb2.ChatMessages:
    out = common_pb2.ChatMessages()
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        out.messages.add(role=role, content=content)
    return out


def build_request(prompt: Prompt, model: str, cache: CachePolicy | None, priority: int, allow_sampled_cache: bool,
                  sampling: Mapping[str, object]) -> gateway_pb2.GatewayRequest:
    """The GatewayRequest for one call; `model` "" lets the gateway pick its first configured model."""
    if cache is not None and cache not in CACHE_POLICIES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_POLICIES)}, not {cache!r}")
    req = gateway_pb2.GatewayRequest(model=model, priority=priority, allow_sampled_cache=allow_sampled_cache)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.messages.CopyFrom(chat_messages(prompt))
    if sampling:
        req.sampling.CopyFrom(sampling_params(sampling))
    if cache is not None:
        req.cache_policy = CACHE_POLICIES[cache]
    return req
