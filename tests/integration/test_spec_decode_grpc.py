"""Speculative decoding over gRPC (real socket, port 0): the per-request override in GenerateRequest,
bad values refused with INVALID_ARGUMENT, and the acceptance metrics on the replica's /metrics port."""

from __future__ import annotations

import urllib.request

import grpc
import pytest

from services.common.pb import common_pb2, inference_pb2, inference_pb2_grpc
from services.inference.config import engine_config
from services.inference.main import InferenceService, InferenceServiceConfig
from tests.integration.test_spec_decode import GROUNDED

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def replica(make_engine):
    engine = make_engine("float32", speculative="ngram", num_speculative_tokens=4)
    svc = InferenceService(InferenceServiceConfig(engine=engine_config(dtype="float32", speculative="ngram"), port=0,
                                                  replica_id="spec", metrics_port=0), engine=engine)
    port = await svc.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield svc, inference_pb2_grpc.InferenceStub(channel)
    await svc.stop()


def request(text: str, speculative: common_pb2.SpeculativeOverride | None = None) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=text)]),
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), speculative=speculative)


def scrape(svc) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.server.metrics_port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("strata:spec")}


async def test_overrides_metrics_and_bad_values(replica, make_engine):
    svc, stub = replica
    before = scrape(svc)["strata:spec_decode_num_drafts_total"]
    off = [t async for c in stub.Generate(request(GROUNDED[0], common_pb2.SpeculativeOverride(enabled=False)))
           for t in c.token_ids]
    assert scrape(svc)["strata:spec_decode_num_drafts_total"] == before          # this request did not speculate
    on = [t async for c in stub.Generate(request(GROUNDED[0], common_pb2.SpeculativeOverride(num_speculative_tokens=3)))
          for t in c.token_ids]
    assert on == off and len(on) == 32
    m = scrape(svc)
    assert m["strata:spec_decode_num_drafts_total"] > before
    assert 0 < m["strata:spec_decode_num_accepted_tokens_total"] <= m["strata:spec_decode_num_draft_tokens_total"]
    assert 0 < m["strata:spec_decode_acceptance_rate"] <= 1 and m["strata:spec_decode_mean_tokens_per_step"] > 1
    assert m['strata:spec_decode_num_accepted_tokens_per_pos_total{position="0"}'] > 0
    for bad in (-1, 99):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(request("hi", common_pb2.SpeculativeOverride(num_speculative_tokens=bad))):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_speculative_tokens" in err.value.details()
