"""Protobuf ↔ the gateway's types, for the pieces both gRPC edges carry: the servicer (GatewayRequest in,
GatewayChunk / GatewayResponse out) and the downstream adapter (cache and router messages). The pipeline
never imports this module.

Cheap by design: it runs for every streamed chunk. Sampling keeps presence: a proto3 `optional` field
that is unset is None in the gateway's types and unset again on the way out (the cache keys tell "unset"
from 0)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from services.common.pb import FORMAT_KINDS, TOOL_CHOICES, common_pb2
from services.gateway.types import (FinishReason, Message, ResponseFormat, Sampling, Source, SourceKind, TokenLogprob,
                                    Tool, ToolCall, Tools, TopLogprob, Usage)

_SAMPLING_FIELDS = tuple(f.name for f in fields(Sampling))
_MEMO_SIZE = 1024                     # distinct sampling settings remembered; then all forgotten at once
_FINISH = {common_pb2.FINISH_REASON_STOP: FinishReason.STOP, common_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
           common_pb2.FINISH_REASON_ABORT: FinishReason.ABORT, common_pb2.FINISH_REASON_ERROR: FinishReason.ERROR,
           common_pb2.FINISH_REASON_TOOL_CALLS: FinishReason.TOOL_CALLS}
_CHOICE_PB = {v: k for k, v in TOOL_CHOICES.items()}
_FINISH_PB = {v: k for k, v in _FINISH.items()}
_KIND = {common_pb2.Source.KIND_MODEL: SourceKind.MODEL, common_pb2.Source.KIND_CACHE_EXACT: SourceKind.CACHE_EXACT,
         common_pb2.Source.KIND_CACHE_SEMANTIC: SourceKind.CACHE_SEMANTIC}
_KIND_PB = {v: k for k, v in _KIND.items()}
_FORMAT_PB = {v: k for k, v in FORMAT_KINDS.items()}
# each distinct setting a caller sends is translated once; its message is found again by identity, not
# equality (0.0 == -0.0, yet the cache keys tell them apart)
_interned: dict[bytes, Sampling] = {}
_pb_of: dict[int, tuple[Sampling, common_pb2.SamplingParams]] = {}


def sampling_from_pb(s: common_pb2.SamplingParams) -> Sampling:
    """The same Sampling for the same setting (a request's sampling is usually one of a few)."""
    raw = s.SerializeToString()
    out = _interned.get(raw)
    if out is None:
        if len(_interned) >= _MEMO_SIZE:
            _interned.clear()
            _pb_of.clear()
        present = s.ListFields()      # only the fields that are set: optional ones by presence
        out = _interned[raw] = Sampling(**{f.name: tuple(v) if f.is_repeated else
                                           format_from_pb(v) if f.name == "response_format" else v for f, v in present})
        _pb_of[id(out)] = (out, _sampling_pb(out))
    return out


def sampling_to_pb(s: Sampling) -> common_pb2.SamplingParams:
    """A message to copy, never to change: for a Sampling from sampling_from_pb it is shared (a protobuf
    constructor or CopyFrom copies it)."""
    known = _pb_of.get(id(s))
    return known[1] if known is not None and known[0] is s else _sampling_pb(s)


def _sampling_pb(s: Sampling) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**{n: format_to_pb(v) if n == "response_format" else v
                                        for n in _SAMPLING_FIELDS if (v := getattr(s, n)) is not None})


def format_from_pb(f: common_pb2.ResponseFormat) -> ResponseFormat | None:
    """None for free text; an unknown type is kept by its number, for the replica to refuse."""
    if f.type == common_pb2.ResponseFormat.TYPE_TEXT:
        return None
    return ResponseFormat(FORMAT_KINDS.get(f.type, str(f.type)), f.spec, f.strict)


def format_to_pb(f: ResponseFormat) -> common_pb2.ResponseFormat:
    kind = _FORMAT_PB.get(f.kind)
    return common_pb2.ResponseFormat(type=kind if kind is not None else int(f.kind), spec=f.spec, strict=f.strict)


def messages_from_pb(m: common_pb2.ChatMessages) -> tuple[Message, ...]:
    return tuple([Message(x.role, x.content, tuple(tool_calls_from_pb(x.tool_calls)), x.tool_call_id)
                  if x.tool_calls or x.tool_call_id else Message(x.role, x.content) for x in m.messages])


def tools_from_pb(m: common_pb2.ChatMessages) -> Tools | None:
    """None when the conversation offers no tools and leaves the choice alone."""
    if not m.tools and not m.HasField("tool_choice") and not m.HasField("parallel_tool_calls"):
        return None
    return Tools(tuple(Tool(t.name, t.description, t.parameters) for t in m.tools),
                 TOOL_CHOICES.get(m.tool_choice.mode, str(m.tool_choice.mode)), m.tool_choice.function,
                 m.parallel_tool_calls if m.HasField("parallel_tool_calls") else None)


def tool_calls_from_pb(calls) -> list[ToolCall]:
    return [ToolCall(c.id, c.name, c.arguments) for c in calls]


def tool_calls_to_pb(calls) -> list[common_pb2.ToolCall]:
    return [common_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]


def set_input(message: Any, prompt: str, messages: tuple[Message, ...] | None, tools: Tools | None = None) -> None:
    """Fill the `input` oneof (prompt or messages, with the tools offered) of a CacheQuery or GenerateRequest."""
    if messages is None:
        message.prompt = prompt
        return
    chat = message.messages
    chat.SetInParent()                # chat input even when the list is empty
    add = chat.messages.add
    for m in messages:
        if m.tool_calls or m.tool_call_id:
            add(role=m.role, content=m.content, tool_calls=tool_calls_to_pb(m.tool_calls), tool_call_id=m.tool_call_id)
        else:
            add(role=m.role, content=m.content)
    if tools is not None:
        for t in tools.tools:
            chat.tools.add(name=t.name, description=t.description, parameters=t.parameters)
        mode = _CHOICE_PB.get(tools.choice)
        chat.tool_choice.mode = mode if mode is not None else int(tools.choice)
        chat.tool_choice.function = tools.function
        if tools.parallel is not None:
            chat.parallel_tool_calls = tools.parallel


def logprobs_from_pb(lps) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(lp.token_id, lp.token, lp.logprob,
                              tuple(TopLogprob(t.token_id, t.token, t.logprob) for t in lp.top)) for lp in lps)


def logprobs_to_pb(lps) -> list[common_pb2.TokenLogprob]:
    return [common_pb2.TokenLogprob(token_id=lp.token_id, token=lp.token, logprob=lp.logprob,
                                    top=[common_pb2.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob)
                                         for t in lp.top]) for lp in lps]


def usage_from_pb(u: common_pb2.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)


def usage_to_pb(u: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                            cached_prompt_tokens=u.cached_prompt_tokens)


def source_from_pb(s: common_pb2.Source) -> Source:
    return Source(_KIND.get(s.kind, SourceKind.NONE), s.model, s.replica, s.entry_id, s.route)


def source_to_pb(s: Source) -> common_pb2.Source:
    return common_pb2.Source(kind=_KIND_PB.get(s.kind, common_pb2.Source.KIND_UNSPECIFIED), model=s.model,
                             replica=s.replica, entry_id=s.entry_id, route=s.route)


def finish_reason_from_pb(value: int) -> FinishReason | None:
    """None for UNSPECIFIED (not finished; or a cached answer whose storer did not say)."""
    if value == common_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return _FINISH.get(value, FinishReason.ERROR)


def finish_reason_to_pb(reason: FinishReason | None) -> int:
    return common_pb2.FINISH_REASON_UNSPECIFIED if reason is None else _FINISH_PB[reason]
