"""The gateway's gRPC edges translate without losing anything: a GatewayRequest's sampling fields keep their
presence through the gateway's own types, so the cache query the adapter builds is field for field what the
caller sent (the cache keys depend on it), and the last chunk carries usage and source while the others
carry neither."""

from __future__ import annotations

import dataclasses

import pytest

from services.common.pb import cache_pb2, common_pb2, gateway_pb2
from services.gateway.backends import CacheQuery
from services.gateway.clients import query_to_pb
from services.gateway.servicer import chunk_to_pb, request_from_pb, result_to_pb
from services.gateway.types import (CachePolicy, Chunk, Finish, FinishReason, Result, Sampling, Source, SourceKind,
                                    Usage)

SAMPLINGS = [
    common_pb2.SamplingParams(),
    common_pb2.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
    common_pb2.SamplingParams(temperature=0.7, top_p=0.9, seed=0, logprobs=0, min_tokens=0),
    common_pb2.SamplingParams(top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=-0.5,
                              frequency_penalty=0.0, stop=["\n", "END"], stop_token_ids=[2, 7]),
]
INPUTS = [{"prompt": "Say hi"},
          {"messages": common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="system", content="Be brief."),
                                                         common_pb2.ChatMessage(role="user", content="Hi")])}]


def _wire(message) -> bytes:
    return message.SerializeToString(deterministic=True)


def test_the_sampling_type_has_every_field_of_the_protobuf():
    assert [f.name for f in dataclasses.fields(Sampling)] == [
        f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields]


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("given", INPUTS)
def test_the_cache_query_is_the_callers_request_field_for_field(sampling, given):
    req = gateway_pb2.GatewayRequest(model="m", sampling=sampling, **given)
    r = request_from_pb(req)
    built = query_to_pb(CacheQuery("acme", "m", r.prompt, r.messages, r.sampling))
    expected = cache_pb2.CacheQuery(namespace="acme", model="m", sampling=req.sampling, **given)
    assert _wire(built) == _wire(expected)
    for name in ("temperature", "seed", "max_tokens", "logprobs", "min_tokens", "top_k"):
        assert built.sampling.HasField(name) == req.sampling.HasField(name), name


def test_settings_equal_as_numbers_but_apart_in_the_cache_keys_stay_apart():
    """0.0 == -0.0, yet the cache's exact key tells them apart: translating one must not reuse the other."""
    for t in (0.0, -0.0, 0.0):
        req = gateway_pb2.GatewayRequest(prompt="x", sampling=common_pb2.SamplingParams(temperature=t))
        r = request_from_pb(req)
        built = query_to_pb(CacheQuery("acme", "m", r.prompt, r.messages, r.sampling))
        assert _wire(built.sampling) == _wire(req.sampling)


@pytest.mark.parametrize("policy, expected", [
    (common_pb2.CACHE_POLICY_UNSPECIFIED, CachePolicy.USE), (common_pb2.CACHE_POLICY_USE, CachePolicy.USE),
    (common_pb2.CACHE_POLICY_BYPASS, CachePolicy.BYPASS), (common_pb2.CACHE_POLICY_REFRESH, CachePolicy.REFRESH),
    (9, CachePolicy.REFRESH)])          # an unknown value: no lookup, the answer stored
def test_cache_policies_translate(policy, expected):
    assert request_from_pb(gateway_pb2.GatewayRequest(prompt="x", cache_policy=policy)).cache_policy is expected


def test_an_empty_message_list_is_still_chat_input():
    r = request_from_pb(gateway_pb2.GatewayRequest(messages=common_pb2.ChatMessages()))
    assert r.messages == () and not r.prompt


def test_only_the_last_chunk_carries_usage_source_and_flags():
    middle = chunk_to_pb(Chunk("id", "Hello ", (1, 2)))
    assert middle.text == "Hello " and list(middle.token_ids) == [1, 2]
    assert not middle.HasField("usage") and not middle.HasField("source") and not middle.HasField("mean_logprob")
    finish = Finish(FinishReason.STOP, Usage(), Source(SourceKind.CACHE_EXACT, "m", entry_id="e1"), ("pii:EMAIL",))
    last = chunk_to_pb(Chunk("id", "world", (3,), finish))
    assert last.HasField("usage") and last.usage.completion_tokens == 0
    assert last.source.kind == common_pb2.Source.KIND_CACHE_EXACT and last.source.entry_id == "e1"
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP and list(last.flags) == ["pii:EMAIL"]
    assert not last.HasField("mean_logprob")


def test_a_result_keeps_its_mean_logprob():
    finish = Finish(FinishReason.LENGTH, Usage(4, 5, 1), Source(SourceKind.MODEL, "m", "r-1"), mean_logprob=-0.5)
    out = result_to_pb(Result("id", "abc", [1, 2, 3], finish))
    assert out.HasField("mean_logprob") and out.mean_logprob == -0.5
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.cached_prompt_tokens) == (4, 5, 1)
    assert out.source.replica == "r-1" and out.finish_reason == common_pb2.FINISH_REASON_LENGTH
