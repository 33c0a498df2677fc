"""Traces and metrics across the four services on real sockets (port 0): real Redis, the real model.

One request makes one trace whose spans come from all four services, each linked to its real parent
through the W3C context carried in gRPC metadata (or in the LookupStream message); a cache hit's trace
has no router or inference span; no span holds the prompt; the /metrics side ports answer and move."""

from __future__ import annotations

import json
import os
import urllib.request

import grpc
import pytest

from services.common import telemetry
from services.common.pb import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.main import GatewayService, GatewayServiceConfig
from services.gateway.config import GatewayConfig
from tests.integration.downstream import running_downstream

pytestmark = pytest.mark.asyncio(loop_scope="session")
ADMIN, PEPPER = "admin-token-for-tests", "pepper-for-tests-0123456789"
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "Name three primary colours, my email is jane.doe@example.com"


@pytest.fixture()
async def suite(redis_url, make_engine, embedder):
    async with running_downstream(redis_url, make_engine("float32"), embedder, replica_id="r-obs",
                                  metrics_port=0) as down:
        gateway = GatewayService(GatewayServiceConfig(GatewayConfig(), redis_url, down.router_address,
                                                      down.cache_address, PEPPER, ADMIN),
                                 embedder=embedder, metrics_port=0)
        gport = await gateway.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gport}")
        yield channel, {"gateway": gateway, "cache": down.cache, "router": down.router, "inference": down.replica}
        await channel.close()
        await gateway.stop(0)


def _new_spans(offset: int) -> list[dict]:
    telemetry.flush()
    with open(os.environ["STRATA_TRACE_FILE"], "rb") as f:
        f.seek(offset)
        return [json.loads(line) for line in f.read().decode().splitlines()]


def _trace_file_size() -> int:
    telemetry.flush()
    path = os.environ["STRATA_TRACE_FILE"]
    return os.path.getsize(path) if os.path.exists(path) else 0


def _scrape(service) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{service.server.metrics_port}/metrics", timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


def _value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in the scrape")


async def test_the_series_the_inference_autoscaling_reads_are_exported_by_a_replica(suite):
    """deploy/k8s/prometheus-adapter/rules.yaml turns these series into the inference HPAs' metrics."""
    import re
    from pathlib import Path

    import yaml

    rules = yaml.safe_load((Path(__file__).parents[2] / "deploy/k8s/prometheus-adapter/rules.yaml").read_text())
    exported = {re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0)
                for line in _scrape(suite[1]["inference"]).splitlines() if line and not line.startswith("#")}
    for rule in rules["rules"]["custom"]:
        series = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["seriesQuery"]).group(0)
        assert series in exported, series


async def test_one_request_is_one_trace_over_four_services_and_a_cache_hit_skips_router_and_inference(suite):
    channel, services = suite
    admin = gateway_pb2_grpc.GatewayAdminStub(channel)
    key = (await admin.CreateKey(gateway_pb2.CreateKeyRequest(tenant="obs", models=[MODEL]),
                                 metadata=(("authorization", f"Bearer {ADMIN}"),))).key
    gw = gateway_pb2_grpc.GatewayStub(channel)
    req = gateway_pb2.GatewayRequest(model=MODEL, messages=common_pb2.ChatMessages(messages=[
        common_pb2.ChatMessage(role="user", content=PROMPT)]),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    auth = (("authorization", f"Bearer {key}"),)

    before = _trace_file_size()
    first = await gw.Generate(req, metadata=auth, timeout=60)
    assert first.source.kind == common_pb2.Source.KIND_MODEL
    spans = _new_spans(before)
    assert len({s["trace_id"] for s in spans}) == 1, sorted({(s["service"], s["name"]) for s in spans})
    by_id = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if s["parent_span_id"] is None]
    assert [r["name"] for r in roots] == ["strata.v1.Gateway/Generate"]
    assert all(s["parent_span_id"] in by_id for s in spans if s is not roots[0])
    assert {s["service"] for s in spans} == {"strata-gateway", "strata-cache", "strata-router", "strata-inference"}

    def one(service: str, name: str) -> dict:
        found = [s for s in spans if s["service"] == service and s["name"] == name]
        assert len(found) == 1, (service, name, [(s["service"], s["name"]) for s in spans])
        return found[0]

    def parent(s: dict) -> dict:
        return by_id[s["parent_span_id"]]
    gw_root = roots[0]
    for name in ("auth", "guardrails", "limits", "cache.lookup", "router.generate", "cache.store"):
        assert parent(one("strata-gateway", name)) is gw_root
    assert parent(one("strata-cache", "strata.v1.SemanticCache/Lookup"))["name"] == "cache.lookup"
    assert parent(one("strata-cache", "strata.v1.SemanticCache/Store"))["name"] == "cache.store"
    router_root = one("strata-router", "strata.v1.Router/Generate")
    assert parent(router_root)["name"] == "router.generate"
    route = one("strata-router", "route")
    assert parent(route) is router_root and route["attributes"]["strata.replica"] == "r-obs"
    inference_root = one("strata-inference", "strata.v1.Inference/Generate")
    assert parent(inference_root) is route
    for name in ("queue", "prefill", "decode"):
        phase = one("strata-inference", name)
        assert parent(phase) is inference_root
        assert inference_root["start_unix_ns"] <= phase["start_unix_ns"] <= phase["end_unix_ns"]
    assert one("strata-inference", "decode")["attributes"]["strata.completion_tokens"] == 5
    raw = json.dumps(spans)
    assert "primary colours" not in raw and "jane.doe" not in raw and key not in raw

    before = _trace_file_size()
    hit = await gw.Generate(req, metadata=auth, timeout=30)
    assert hit.source.kind == common_pb2.Source.KIND_CACHE_EXACT
    spans = _new_spans(before)
    assert len({s["trace_id"] for s in spans}) == 1
    assert {s["service"] for s in spans} == {"strata-gateway", "strata-cache"}
    lookup = next(s for s in spans if s["name"] == "strata.v1.SemanticCache/Lookup")
    assert lookup["attributes"]["strata.cache.hit"] is True and lookup["attributes"]["strata.cache.layer"] == "exact"

    gw_m, cache_m = _scrape(services["gateway"]), _scrape(services["cache"])
    router_m, inf_m = _scrape(services["router"]), _scrape(services["inference"])
    assert _value(gw_m, 'strata:gateway_requests_total{code="OK",source="model"}') == 1
    assert _value(gw_m, 'strata:gateway_requests_total{code="OK",source="cache_exact"}') == 1
    assert _value(gw_m, 'strata:gateway_tokens_total{kind="completion"}') == 5
    assert _value(gw_m, 'strata:guardrail_events_total{event="pii:EMAIL"}') == 2
    assert _value(cache_m, 'strata:cache_hits_total{layer="exact"}') == 1
    assert _value(cache_m, "strata:cache_stores_total") == 1
    assert _value(router_m, 'strata:router_requests_total{code="OK"}') == 1
    assert _value(router_m, 'strata:circuit_state{address="127.0.0.1:%d",replica="r-obs"}'
                  % services["inference"].server.port) == 0
    assert _value(inf_m, "strata:time_to_first_token_seconds_count") == 1
    assert _value(inf_m, "strata:inter_token_latency_seconds_count") == 4
    assert _value(inf_m, 'strata:request_success_total{finished_reason="length"}') == 1
    assert _value(inf_m, "strata:generation_tokens_total") >= 5
    assert 0 <= _value(inf_m, "strata:kv_cache_usage_perc") <= 1


async def test_a_rejected_request_is_counted_and_its_trace_says_why(suite):
    channel, services = suite
    admin = gateway_pb2_grpc.GatewayAdminStub(channel)
    key = (await admin.CreateKey(gateway_pb2.CreateKeyRequest(
        tenant="obs", models=[MODEL], limits=gateway_pb2.KeyLimits(requests_per_minute=1)),
        metadata=(("authorization", f"Bearer {ADMIN}"),))).key
    gw = gateway_pb2_grpc.GatewayStub(channel)
    req = gateway_pb2.GatewayRequest(model=MODEL, prompt="Say hi", sampling=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=2))
    await gw.Generate(req, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
    before = _trace_file_size()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.Generate(req, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    spans = _new_spans(before)
    root = next(s for s in spans if s["parent_span_id"] is None)
    assert root["status"] == "error" and root["attributes"]["rpc.grpc.status_code"] == 8
    assert {s["service"] for s in spans} == {"strata-gateway"}
    gw_m = _scrape(services["gateway"])
    assert _value(gw_m, 'strata:ratelimit_rejections_total{limit="requests_per_minute"}') == 1
    assert _value(gw_m, 'strata:gateway_requests_total{code="RESOURCE_EXHAUSTED",source="none"}') == 1


async def test_no_secret_key_prompt_or_answer_reaches_logs_spans_or_metrics(suite):
    """Everything the four services log (at DEBUG, through the services' own JSON formatter), every span and
    every metrics sample of a run is scanned for the API key, the admin token, the key pepper, the prompt
    and the answer: none may appear."""
    import io
    import logging

    from services.common.logs import JsonFormatter

    channel, services = suite
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("scan"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    before = _trace_file_size()
    try:
        admin = gateway_pb2_grpc.GatewayAdminStub(channel)
        key = (await admin.CreateKey(gateway_pb2.CreateKeyRequest(tenant="scan", models=[MODEL]),
                                     metadata=(("authorization", f"Bearer {ADMIN}"),))).key
        gw = gateway_pb2_grpc.GatewayStub(channel)
        prompt = "Describe the orange zeppelin named Quillfeather over Lake Vostrikova"
        req = gateway_pb2.GatewayRequest(model=MODEL, prompt=prompt, sampling=common_pb2.SamplingParams(
            temperature=0.0, max_tokens=12, ignore_eos=True))
        answer = (await gw.Generate(req, metadata=(("authorization", f"Bearer {key}"),), timeout=60)).text
        streamed = "".join([c.text async for c in gw.GenerateStream(req, metadata=(("authorization", f"Bearer {key}"),),
                                                                     timeout=60)])
        with pytest.raises(grpc.aio.AioRpcError):                        # a wrong key is logged as a failure
            await gw.Generate(req, metadata=(("authorization", f"Bearer {key}x"),), timeout=60)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    logs = stream.getvalue()
    spans = json.dumps(_new_spans(before))
    metrics = "".join(_scrape(s) for s in services.values())
    assert logs and spans and metrics
    assert answer.strip() and streamed == answer
    secret = key[len("sk-strata-") + 13:]                                 # sk-strata-<12 hex id>-<secret>
    assert len(secret) >= 20
    needles = {"api key": key, "key secret": secret, "admin token": ADMIN, "pepper": PEPPER,
               "prompt": "Quillfeather", "prompt words": "orange zeppelin", "answer": answer.strip()}
    for where, text in (("logs", logs), ("spans", spans), ("metrics", metrics)):
        leaked = [name for name, needle in needles.items() if needle and needle in text]
        assert not leaked, f"{leaked} found in {where}"
