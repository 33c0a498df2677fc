"""Telemetry export as deployed: a service process sends its spans over OTLP/gRPC to a collector when
OTEL_EXPORTER_OTLP_ENDPOINT is set (here a real OTLP TraceService on port 0), and log lines written
inside a traced call carry its trace and span ids."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.cache import wait_serving
from services.common import telemetry
from services.common.logs import JsonFormatter
from services.common.pb import cache_pb2, cache_pb2_grpc, common_pb2

ROOT = Path(__file__).resolve().parents[2]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []      # (service.name, span name, trace id)

    async def Export(self, request, context):
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append((service, s.name, s.trace_id.hex()))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_service_exports_its_spans_over_otlp_with_the_callers_trace_id(redis_url, tmp_path):
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}", "OTEL_BSP_SCHEDULE_DELAY": "100",
           "STRATA_TRACE_FILE": str(tmp_path / "must-not-be-written.jsonl")}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "cache", "--port", str(port),
                             "--metrics-port", "-1", "--redis-url", redis_url], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        await wait_serving(port, "strata.v1.SemanticCache", Path(os.devnull), timeout_s=60)
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        q = cache_pb2.CacheQuery(namespace="otlp", model="m", prompt="What is OTLP?",
                                 sampling=common_pb2.SamplingParams(temperature=0.0))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await cache_pb2_grpc.SemanticCacheStub(ch).Lookup(
                cache_pb2.LookupRequest(query=q), timeout=10,
                metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),))
        deadline = time.monotonic() + 10
        while not collector.spans and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert ("strata-cache", "strata.v1.SemanticCache/Lookup", trace_id) in collector.spans, collector.spans
        assert not (tmp_path / "must-not-be-written.jsonl").exists()
    finally:
        proc.terminate()
        proc.wait(15)
        await server.stop(0)


def test_a_log_line_inside_a_span_carries_its_trace_and_span_ids():
    formatter = JsonFormatter("gateway")
    tracer = telemetry.tracer("log-test")
    with tracer.start_as_current_span("work") as span:
        line = json.loads(formatter.format(logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None)))
    ctx = span.get_span_context()
    assert line["trace_id"] == f"{ctx.trace_id:032x}" and line["span_id"] == f"{ctx.span_id:016x}"
    outside = json.loads(formatter.format(logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None)))
    assert "trace_id" not in outside
