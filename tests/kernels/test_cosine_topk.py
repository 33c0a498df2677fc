"""Batched cosine top-k (the semantic cache's search) against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels not built (make install)")


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def queries_near(rows: torch.Tensor, m: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    picks = torch.randint(0, rows.shape[0], (m,), generator=g)
    return F.normalize(rows[picks] + noise * torch.randn(m, rows.shape[1], generator=g), dim=1).contiguous()


@pytest.mark.parametrize("n", [1, 7, 64, 65, 1000, 12_000])            # 12k x 384: the multi-threaded path
@pytest.mark.parametrize("d", [64, 100, 384])                           # 100: not a multiple of the SIMD width
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("k", [1, 5, 64])
def test_int8_screened_topk_equals_float32_topk(n, d, m, k):
    rows = unit_rows(n, d, seed=n * 7 + d)
    parts = (torch.arange(n, dtype=torch.int32) % 3)
    q = queries_near(rows, m, noise=0.3, seed=n + d)
    qp = torch.arange(m, dtype=torch.int32) % 4                       # partition 3 has no rows at all
    codes, scale, err = kernels.quantize_rows_int8(rows)
    got_rows, got_scores = kernels.cosine_topk(rows, codes, scale, err, parts, q, qp, k)
    ref_rows, ref_scores = reference.cosine_topk(rows, parts, q, qp, k)
    torch.testing.assert_close(got_rows, ref_rows, atol=0, rtol=0)
    torch.testing.assert_close(got_scores, ref_scores, atol=1e-5, rtol=1.3e-6)
    assert bool((got_rows[qp == 3] == -1).all()) and bool(torch.isneginf(got_scores[qp == 3]).all())
    f_rows, f_scores = kernels.cosine_topk_f32(rows, parts, q, qp, k)
    torch.testing.assert_close(f_rows, ref_rows, atol=0, rtol=0)
    torch.testing.assert_close(f_scores, ref_scores, atol=1e-5, rtol=1.3e-6)


def test_near_duplicates_inside_the_int8_error_are_ranked_by_float32():
    """2,000 rows whose scores differ by ~1e-4, far less than the int8 error (~1e-2): the screen cannot
    order them, the float32 re-score must (and the gaps stay well above float32 rounding)."""
    base = unit_rows(1, 384, seed=1)[0]
    g = torch.Generator().manual_seed(2)
    rows = F.normalize(base + 1e-2 * torch.randn(2000, 384, generator=g), dim=1)
    rows = torch.cat([rows, unit_rows(20_000, 384, seed=3)]).contiguous()
    parts = torch.zeros(len(rows), dtype=torch.int32)
    q = base[None, :].contiguous()
    codes, scale, err = kernels.quantize_rows_int8(rows)
    got = kernels.cosine_topk(rows, codes, scale, err, parts, q, torch.zeros(1, dtype=torch.int32), 10)
    ref = reference.cosine_topk(rows, parts, q, torch.zeros(1, dtype=torch.int32), 10)
    assert float((ref[1][0, :-1] - ref[1][0, 1:]).min()) > 1e-6          # the order is not a rounding artefact
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1.3e-6)


def test_equal_scores_keep_the_lower_row_first():
    row = unit_rows(1, 64, seed=5)
    rows = row.repeat(10, 1).contiguous()
    parts = torch.zeros(10, dtype=torch.int32)
    codes, scale, err = kernels.quantize_rows_int8(rows)
    got_rows, _ = kernels.cosine_topk(rows, codes, scale, err, parts, row, torch.zeros(1, dtype=torch.int32), 4)
    assert got_rows.tolist() == [[0, 1, 2, 3]]


def test_int8_error_bound_holds_for_every_row():
    rows = unit_rows(5000, 384, seed=9)
    codes, scale, err = kernels.quantize_rows_int8(rows)
    residual = (rows.double() - scale.double()[:, None] * codes.double()).norm(dim=1)
    assert bool((residual <= err.double()).all())
    assert int(codes.abs().max()) <= 127


@pytest.mark.parametrize("bad, message", [
    (dict(rows=torch.zeros(4, 8, dtype=torch.float64)), "rows must be torch.float32"),
    (dict(parts=torch.zeros(4, dtype=torch.int64)), "parts must be torch.int32"),
    (dict(queries=torch.zeros(1, 9)), r"queries must have shape \(1, 8\)"),
    (dict(queries=torch.zeros(8, 2).t(), query_parts=torch.zeros(2, dtype=torch.int32)), "queries must be contiguous"),
    (dict(codes=torch.zeros(4, 8, dtype=torch.uint8)), "codes must be torch.int8"),
    (dict(k=-1), "k must be >= 0"),
])
def test_bad_inputs_are_rejected_with_a_clear_error(bad, message):
    args = dict(rows=torch.zeros(4, 8), codes=torch.zeros(4, 8, dtype=torch.int8), scale=torch.ones(4),
                err=torch.zeros(4), parts=torch.zeros(4, dtype=torch.int32), queries=torch.zeros(1, 8),
                query_parts=torch.zeros(1, dtype=torch.int32), k=2)
    args.update(bad)
    with pytest.raises((TypeError, ValueError), match=message):
        kernels.cosine_topk(**args)


def test_reference_path_can_be_forced(monkeypatch):
    rows = unit_rows(300, 64, seed=11)
    parts = torch.zeros(300, dtype=torch.int32)
    q = queries_near(rows, 2, 0.2, seed=12)
    qp = torch.zeros(2, dtype=torch.int32)
    codes, scale, err = kernels.quantize_rows_int8(rows)
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    assert not kernels.available()
    forced = kernels.cosine_topk(rows, codes, scale, err, parts, q, qp, 3)
    monkeypatch.delenv("STRATA_KERNELS")
    assert kernels.available()
    compiled = kernels.cosine_topk(rows, codes, scale, err, parts, q, qp, 3)
    torch.testing.assert_close(forced, compiled, atol=1e-5, rtol=1.3e-6)
