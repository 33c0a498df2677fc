"""Serving metrics in vLLM's terms, computed from per-request token arrival times.

TTFT: request sent -> first output token received. ITL: gap between successive token arrivals
(a chunk of k tokens counts as one gap followed by k-1 zero gaps, like vLLM's benchmark).
TPOT: (e2e - TTFT) / (n - 1) per request. Output tokens/s: all output tokens of a phase over its
wall time (first request sent -> last token received), prefill included.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestTiming:
    sent_s: float                                            # perf_counter when the request was sent
    arrivals_s: list[float] = field(default_factory=list)    # perf_counter of every output token

    @property
    def num_output_tokens(self) -> int:
        return len(self.arrivals_s)

    @property
    def ttft_s(self) -> float:
        return self.arrivals_s[0] - self.sent_s

    @property
    def e2e_s(self) -> float:
        return self.arrivals_s[-1] - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        n = self.num_output_tokens
        return (self.e2e_s - self.ttft_s) / (n - 1) if n > 1 else None

    @property
    def itls_s(self) -> list[float]:
        a = self.arrivals_s
        return [b - c for b, c in zip(a[1:], a[:-1])]


@dataclass(slots=True, frozen=True)
class PhaseResult:
    """One measured run: `concurrency` streams in flight, all requests of the run."""

    concurrency: int
    wall_s: float                    # first request sent -> last token received
    requests: tuple[RequestTiming, ...]


def run_in_waves(run_batch: Callable[[list[list[int]], int], list[RequestTiming]], prompts: list[list[int]],
                 max_tokens: int, concurrency: int) -> PhaseResult:
    """A batch engine's closed loop: `concurrency` prompts at a time, one batch after the other."""
    timings: list[RequestTiming] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        timings.extend(run_batch(prompts[i:i + concurrency], max_tokens))
    return PhaseResult(concurrency, time.perf_counter() - start, tuple(timings))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _dist_ms(values_s: list[float]) -> dict[str, float]:
    out = {"mean": 1e3 * statistics.fmean(values_s) if values_s else float("nan")}
    out.update({f"p{q}": 1e3 * percentile(values_s, q) for q in PERCENTILES})
    return out


def steady_decode_rate(reqs: tuple[RequestTiming, ...]) -> float:
    """Tokens/s while every stream decodes: from the last first token to the first last token. What the
    service costs is read here, since TPOT also carries the other requests' prefills, and those fall
    differently when requests reach a server one by one than when they are all added before a step."""
    start, end = max(r.arrivals_s[0] for r in reqs), min(r.arrivals_s[-1] for r in reqs)
    if end <= start:
        return float("nan")
    return sum(1 for r in reqs for t in r.arrivals_s if start < t <= end) / (end - start)


def summarize(phase: PhaseResult) -> dict:
    """Metrics of one run: percentiles in ms, throughputs in tokens/s."""
    reqs = phase.requests
    tpots = [t for r in reqs if (t := r.tpot_s) is not None]
    num_out = sum(r.num_output_tokens for r in reqs)
    mean_tpot = statistics.fmean(tpots) if tpots else float("nan")
    return {
        "num_requests": len(reqs),
        "output_tokens": num_out,
        "wall_s": phase.wall_s,
        "output_tokens_per_s": num_out / phase.wall_s,
        # streams in flight / mean time per output token: the decode rate with prefill left out
        "decode_tokens_per_s": phase.concurrency / mean_tpot if tpots else float("nan"),
        "steady_decode_tokens_per_s": steady_decode_rate(reqs),
        "ttft_ms": _dist_ms([r.ttft_s for r in reqs]),
        "tpot_ms": _dist_ms(tpots),
        "itl_ms": _dist_ms([x for r in reqs for x in r.itls_s]),
        "e2e_ms": _dist_ms([r.e2e_s for r in reqs]),
    }


def median_of_runs(runs: list[dict]) -> dict:
    """Element-wise median of `summarize` dicts from repeated runs (nested dicts included)."""
    out: dict = {}
    for key, first in runs[0].items():
        if isinstance(first, dict):
            out[key] = median_of_runs([r[key] for r in runs])
        else:
            out[key] = statistics.median(r[key] for r in runs)
    return out


def copy_bandwidth_gbs(repeats: int, mib: int) -> float:
    """Memory's copy rate on every core: bytes read + written per second (STREAM's convention) by torch's
    copy_ of a `mib` MiB float32 buffer, the median of `repeats` after 3 warm-ups."""
    import torch

    src = torch.empty(mib * 2**18)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times) / 1e9
