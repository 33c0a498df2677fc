"""Prometheus metrics: one registry per service, served as text on a side port at /metrics.

Names follow the architecture page (`strata:` prefix, like vLLM's `vllm:`). Counters and histograms
that requests move are defined here in one place per service; gauges and totals the services already
keep (engine stats, cache counters, circuit states) are read at scrape time by collectors, so the
request path pays nothing for them.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)
disable_created_metrics()          # no `_created` series next to every counter and histogram

# seconds; the first buckets resolve a cache hit, the last a long generation on this CPU
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class ServiceMetrics:
    """A service's registry and its side HTTP server (`serve`, `close`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._server = None
        self.port: int | None = None

    def collect_with(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Register a function producing metric families at scrape time."""
        self.registry.register(_FunctionCollector(collect))

    def serve(self, host: str, port: int) -> int | None:
        """Serve /metrics on host:port (0 = a free port; negative = not at all). The bound port."""
        if port < 0:
            return None
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._collect())
        except Exception:  # noqa: BLE001 - a scrape must not fail because one source did
            log.exception("metrics collector failed")
            return []


def gauge(name: str, doc: str, value: float | dict[tuple[str, ...], float], labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    """A gauge family for a collector: one value, or {label values: value} with `labels` named."""
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    for key, v in (value.items() if isinstance(value, dict) else [((), value)]):
        g.add_metric(list(key), v)
    return g


def counter(name: str, doc: str, value: float | dict[tuple[str, ...], float], labels: tuple[str, ...] = ()) -> CounterMetricFamily:
    """A counter family (exposed as `name`_total) for a collector, like `gauge`."""
    c = CounterMetricFamily(name, doc, labels=list(labels))
    for key, v in (value.items() if isinstance(value, dict) else [((), value)]):
        c.add_metric(list(key), v)
    return c


class InferenceMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.ttft = Histogram("strata:time_to_first_token_seconds", "Request arrival to its first token",
                              registry=r, buckets=LATENCY_BUCKETS)
        self.itl = Histogram("strata:inter_token_latency_seconds", "Time between two outputs of one request, per token",
                             registry=r, buckets=TOKEN_LATENCY_BUCKETS)
        self.e2e = Histogram("strata:e2e_request_latency_seconds", "Request arrival to its last token",
                             registry=r, buckets=LATENCY_BUCKETS)
        self.queue_time = Histogram("strata:request_queue_time_seconds", "Arrival to first scheduled in a batch",
                                    registry=r, buckets=LATENCY_BUCKETS)
        self.requests = Counter("strata:request_success", "Finished requests by finish reason",
                                ["finished_reason"], registry=r)


class CacheMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.lookup_latency = Histogram("strata:cache_lookup_latency_seconds", "Lookup time in the cache service",
                                        registry=self.registry, buckets=LATENCY_BUCKETS)


class GatewayMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter("strata:gateway_requests", "Requests by outcome (gRPC code) and answer source",
                                ["code", "source"], registry=r)
        self.latency = Histogram("strata:gateway_request_latency_seconds", "Gateway request time by answer source",
                                 ["source"], registry=r, buckets=LATENCY_BUCKETS)
        self.ratelimit_rejections = Counter("strata:ratelimit_rejections", "Requests refused by a limit or budget",
                                            ["limit"], registry=r)
        self.tokens = Counter("strata:gateway_tokens", "Tokens charged to keys", ["kind"], registry=r)
        self.guardrails = Counter("strata:guardrail_events", "PII found and injection screens triggered",
                                  ["event"], registry=r)
        self.shed = Counter("strata:gateway_shed", "Requests refused because their model was overloaded, by tier",
                            ["tier", "model"], registry=r)
        self.routed = Counter("strata:gateway_routed", "Requests let in, by model and how it was chosen "
                              "(named, default, auto, split, cascade)", ["model", "route"], registry=r)
        self.budget_soft = Counter("strata:budget_soft_limit", "Requests let in past a budget's soft limit (a "
                                   "share of it, 80% by default), by whose budget: key or tenant", ["scope"], registry=r)
        self.job_items = Counter("strata:job_items", "Background job items ended, by outcome (completed, failed, "
                                 "cancelled, expired)", ["outcome"], registry=r)
        self.job_retries = Counter("strata:job_retries", "Job item runs that failed transiently and were scheduled "
                                   "again", registry=r)
        self.job_throttled = Counter("strata:job_throttled", "Job item runs refused by a limit, shedding or a budget "
                                     "with a retry-after, and scheduled again (not counted as attempts)", registry=r)
        self.job_dead_letters = Counter("strata:job_dead_letters", "Job items given up after their retries",
                                        registry=r)
        self.webhook_deliveries = Counter("strata:webhook_deliveries", "Job webhook deliveries by result (ok, retry, "
                                          "given_up)", ["result"], registry=r)


class RouterMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter("strata:router_requests", "Requests by outcome (gRPC code)", ["code"], registry=r)
        self.attempts = Counter("strata:router_attempts", "Attempts on a replica by result", ["replica", "result"],
                                registry=r)
        self.retries = Counter("strata:router_retries", "Attempts after the first, before any token", registry=r)
        self.fallbacks = Counter("strata:router_fallbacks", "Requests moved to a fallback model group", registry=r)
