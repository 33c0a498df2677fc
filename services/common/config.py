"""Configuration helpers shared by every service's flags: defaults come from STRATA_* environment variables."""

from __future__ import annotations

import os


def env(name: str, default: str | None = None) -> str | None:
    """The environment variable `name`, or `default` when it is unset."""
    return os.environ.get(name, default)


def add_metrics_arg(p, service: str, default: int) -> None:
    """`--metrics-port` (STRATA_<SERVICE>_METRICS_PORT): Prometheus text at http://host:port/metrics."""
    p.add_argument("--metrics-port", type=int, default=int(env(f"STRATA_{service}_METRICS_PORT", str(default))),
                   help=f"Prometheus /metrics side port (0 = a free port, -1 = none; env STRATA_{service}_METRICS_PORT)")
