"""bench.metrics: the steady decode rate counts only the window in which every stream decodes."""

from __future__ import annotations

import math

from bench.metrics import PhaseResult, RequestTiming, steady_decode_rate, summarize


def _timing(sent: float, first: float, gap: float, n: int) -> RequestTiming:
    return RequestTiming(sent_s=sent, arrivals_s=[first + i * gap for i in range(n)])


def test_one_stream_decodes_at_one_over_its_gap():
    assert math.isclose(steady_decode_rate((_timing(0.0, 0.5, 0.01, 101),)), 100.0)


def test_a_late_prefill_is_left_out_of_the_steady_window():
    # stream a starts decoding at 0.1 s; b's prefill ends at 1.0 s, after which both decode every 10 ms
    a = RequestTiming(0.0, [0.1, 0.2, 0.3] + [1.0 + 0.01 * i for i in range(1, 51)])
    b = _timing(0.0, 1.0, 0.01, 51)
    rate = steady_decode_rate((a, b))
    assert math.isclose(rate, 200.0, rel_tol=1e-6)
    # TPOT's decode rate carries b's prefill in a's tokens: lower
    assert summarize(PhaseResult(2, 1.5, (a, b)))["decode_tokens_per_s"] < rate


def test_no_common_window_is_nan():
    assert math.isnan(steady_decode_rate((_timing(0, 0.1, 0.01, 5), _timing(0, 1.0, 0.01, 5))))
