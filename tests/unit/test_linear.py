"""Int8Linear: the int8 (_int_mm) and the float32-emulated products give the same numbers."""

import torch

from services.inference.models.linear import DenseLinear, Int8Linear, int8_matmul_is_fast


def test_int8_emulation_matches_int_mm_and_stays_close_to_dense() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(576, 1536, generator=g)
    x = torch.randn(5, 3, 576, generator=g)
    real, emulated = Int8Linear(w, emulate=False), Int8Linear(w, emulate=True)
    y_real, y_emulated = real(x), emulated(x)
    assert y_real.shape == (5, 3, 1536)
    torch.testing.assert_close(y_emulated, y_real, rtol=1e-5, atol=1e-4)
    dense = DenseLinear(w)(x)
    rel = (y_real - dense).norm() / dense.norm()
    assert 0 < rel < 0.02, rel   # quantization error: present, and small


def test_int8_speed_probe_answers_a_bool() -> None:
    assert isinstance(int8_matmul_is_fast(), bool)


def test_row_buckets_bound_the_shapes_a_long_run_meets() -> None:
    from services.inference.models.linear import row_bucket

    buckets = {row_bucket(m) for m in range(1, 2049)}
    assert len(buckets) == 42 and max(buckets) == 2048
    assert all(row_bucket(m) == m for m in range(1, 17))               # decode steps: exact
    assert all(m <= row_bucket(m) <= 1.25 * m for m in range(65, 10_000))
    assert all(row_bucket(row_bucket(m)) == row_bucket(m) for m in range(1, 5000))


def test_bf16_products_run_at_bucketed_row_counts_and_keep_their_values() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(576, 320, generator=g)
    dense = DenseLinear(w.to(torch.bfloat16))
    seen = []
    original = torch.Tensor.__matmul__
    for rows in (1, 16, 17, 65, 300):
        x = torch.randn(rows, 576, generator=g)
        try:
            torch.Tensor.__matmul__ = lambda a, b: seen.append(a.shape[0]) or original(a, b)  # type: ignore[method-assign]
            y = dense(x.to(torch.bfloat16))
        finally:
            torch.Tensor.__matmul__ = original                                                # type: ignore[method-assign]
        assert y.shape == (rows, 320) and y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), x @ w, rtol=0.05, atol=0.3)
    assert seen == [1, 16, 24, 80, 320]
    assert torch.equal(DenseLinear(w)(x), x @ w)                       # float32 (MKL): exact rows, no padding


def test_bf16_products_over_many_row_counts_keep_the_heap_bounded() -> None:
    # oneDNN keeps ~0.6 MiB per bf16 product shape, partly beyond its cache's capacity: 584 row counts
    # without buckets grew the heap by ~330 MiB (a replica's memory crept for as long as new step sizes came).
    # Every other row count here (292 shapes, ~165 MiB without buckets): bf16 products are emulated, and slow,
    # on CPUs without AVX512-BF16 or AMX
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        import pytest
        pytest.skip("needs glibc's mallinfo2")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    mallinfo2.restype = MallInfo2
    dense = DenseLinear(torch.randn(576, 256).to(torch.bfloat16))
    for rows in range(17, 601, 40):                                      # warm the buckets up
        dense(torch.randn(rows, 576).to(torch.bfloat16))
    before = mallinfo2().uordblks
    for rows in range(17, 601, 2):
        dense(torch.randn(rows, 576).to(torch.bfloat16))
    grown_mib = (mallinfo2().uordblks - before) / 2**20
    assert grown_mib < 40, f"the heap grew {grown_mib:.0f} MiB over 292 row counts"
