"""Tracing for every service: OpenTelemetry, W3C trace context in gRPC metadata.

Each service gets its tracer from `tracer(service)`: its own TracerProvider with resource
`service.name = strata-<service>` (several services share one process in the tests). Spans go to OTLP
when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the OTel SDK reads its usual OTEL_EXPORTER_OTLP_* settings),
else to the JSON-lines file `STRATA_TRACE_FILE` (default `strata-traces.jsonl`; `off` exports nothing).
Sampling follows `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default: every trace; none when
nothing is exported). Tracing every request costs the gateway about a quarter of its cache-hit
throughput on a small machine (README, Benchmarks): busy deployments sample, e.g.
OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01.

Across services the context travels as `traceparent` / `tracestate` metadata (`outgoing()` on the
caller's side, `server_span()` on the server's, opened by grpc_errors.map_errors), or, inside one long-lived stream, as a field of each
message (`traceparent()` / `context_from_traceparent()`). Span attributes carry ids, sizes, models,
replicas and outcomes, never prompt or response text, keys or personal data.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
import time
from typing import Any, Iterable, Sequence

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = ("traceparent", "tracestate")
_providers: dict[str, TracerProvider] = {}
_exporter: SpanExporter | None | bool = False       # False: not chosen yet
_lock = threading.Lock()


class JsonLinesSpanExporter(SpanExporter):
    """One JSON object per finished span, appended to a file (several processes may share it: each
    line is one write to a file opened for appending)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_record(s), separators=(",", ":")) + "\n" for s in spans]
        with self._lock:
            if self._fd < 0:
                return SpanExportResult.FAILURE
            for line in lines:
                os.write(self._fd, line.encode())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:          # shared by every provider of the process: closed at exit
        pass

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def span_record(s: ReadableSpan) -> dict[str, Any]:
    ctx, parent = s.get_span_context(), s.parent
    return {
        "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": s.name, "kind": s.kind.name.lower(),
        "service": s.resource.attributes.get("service.name", ""),
        "start_unix_ns": s.start_time, "end_unix_ns": s.end_time,
        "duration_ms": round(((s.end_time or 0) - (s.start_time or 0)) / 1e6, 3),
        "status": s.status.status_code.name.lower(),
        "attributes": dict(s.attributes or {}),
    }


def _choose_exporter() -> SpanExporter | None:
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    path = os.environ.get("STRATA_TRACE_FILE", "strata-traces.jsonl")
    if path.lower() in ("", "off", "none"):
        return None
    try:
        exporter = JsonLinesSpanExporter(path)
    except OSError as exc:
        log.warning("cannot open the trace file: spans are not exported", extra={"path": path, "error": str(exc)})
        return None
    atexit.register(exporter.close)
    return exporter


def tracer(service: str) -> trace.Tracer:
    """The tracer of `service` (created on first use, then shared)."""
    global _exporter
    with _lock:
        provider = _providers.get(service)
        if provider is None:
            if _exporter is False:
                _exporter = _choose_exporter()
            # nothing exported: spans are not recorded at all (a non-recording span costs almost nothing)
            sampler = ALWAYS_OFF if _exporter is None and not os.environ.get("OTEL_TRACES_SAMPLER") else None
            provider = TracerProvider(resource=Resource.create({"service.name": f"strata-{service}"}), sampler=sampler)
            if _exporter is not None:
                provider.add_span_processor(BatchSpanProcessor(
                    _exporter, schedule_delay_millis=float(os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "500"))))
            _providers[service] = provider
            atexit.register(provider.shutdown)
    return provider.get_tracer("strata")


_UNSAMPLED = contextlib.nullcontext(trace.INVALID_SPAN)


def child_span(tracer_: trace.Tracer, name: str, **kwargs: Any):
    """tracer.start_as_current_span(name) under a recorded span; under an unsampled (or no) span a
    shared no-op instead: the request path pays nothing for spans that would be dropped anyway."""
    if not trace.get_current_span().is_recording():
        return _UNSAMPLED
    return tracer_.start_as_current_span(name, **kwargs)


def flush(timeout_ms: int = 5000) -> None:
    """Export every finished span now (tests; shutdown)."""
    for provider in list(_providers.values()):
        provider.force_flush(timeout_ms)


def outgoing(metadata: Iterable[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """`metadata` plus the current trace context, for a gRPC call."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return (*metadata, *carrier.items())


def traceparent() -> str:
    """The current span's W3C traceparent ("" when there is none), for a message inside a stream."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def context_from_traceparent(value: str) -> otel_context.Context:
    return _PROPAGATOR.extract({"traceparent": value} if value else {})


def context_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> otel_context.Context:
    return _PROPAGATOR.extract({k: v for k, v in (metadata or ()) if k in _TRACE_HEADERS})


def monotonic_to_unix_ns(t: float) -> int:
    """A time.monotonic() reading as the epoch nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.monotonic() - t) * 1e9)


def server_span(servicer: Any, method: str, context: grpc.aio.ServicerContext):
    """The SERVER span of one call on `servicer` (its `tracer` and `SERVICE` name), child of the trace
    context in the call's metadata; a no-op span where the servicer has no tracer or lists the method
    in `UNTRACED` (polled methods)."""
    tracer_ = getattr(servicer, "tracer", None)
    if tracer_ is None or method in getattr(servicer, "UNTRACED", ()):
        return trace.use_span(trace.INVALID_SPAN, end_on_exit=False)
    service = getattr(servicer, "SERVICE", type(servicer).__name__)
    return tracer_.start_as_current_span(
        f"{service}/{method}", context=context_from_metadata(context.invocation_metadata()), kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        record_exception=False, set_status_on_exception=False)


def finish_server_span(span: trace.Span, context: grpc.aio.ServicerContext) -> None:
    """The call's gRPC status on its span (an aborted call has its code set; one the caller cut short has not)."""
    if not span.is_recording():
        return
    code = context.code()
    if code is None or code == grpc.StatusCode.OK:
        code = grpc.StatusCode.CANCELLED if context.cancelled() else grpc.StatusCode.OK
    code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
