"""int8 GEMV (W8A8 decode) against the exact integer reference."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import int8_gemv, reference

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels not built (make install)")


def codes(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 33])                   # row blocks of 8, and a remainder
@pytest.mark.parametrize("n,k", [(1, 32), (63, 576), (1536, 576), (576, 1536), (130, 100)])   # K not a multiple of 32
def test_matches_the_exact_integer_reference(m, n, k):
    xq, wq = codes(m, k, seed=m), codes(n, k, seed=n + k)
    g = torch.Generator().manual_seed(1)
    xs, ws = torch.rand(m, generator=g) + 0.01, torch.rand(n, generator=g) + 0.01
    y = int8_gemv(xq, xs, wq, ws)
    torch.testing.assert_close(y, reference.int8_gemv(xq, xs, wq, ws), rtol=1e-6, atol=1e-5)


def test_extreme_codes_do_not_saturate():
    k = 1536
    xq = torch.full((2, k), 127, dtype=torch.int8)
    xq[1] = -127
    wq = torch.full((3, k), -127, dtype=torch.int8)
    wq[1] = 127
    y = int8_gemv(xq, torch.ones(2), wq, torch.ones(3))
    assert y[0, 0] == -127 * 127 * k and y[0, 1] == 127 * 127 * k and y[1, 1] == -127 * 127 * k


def test_bad_inputs_are_refused():
    xq, wq = codes(2, 64, seed=1), codes(5, 64, seed=2)
    with pytest.raises(TypeError, match="int8"):
        int8_gemv(xq.float(), torch.ones(2), wq, torch.ones(5))
    with pytest.raises(ValueError, match="same K"):
        int8_gemv(xq, torch.ones(2), codes(5, 32, seed=3), torch.ones(5))
    with pytest.raises(ValueError, match=r"w_scale \[5\]"):
        int8_gemv(xq, torch.ones(2), wq, torch.ones(4))
    with pytest.raises(ValueError, match="-127"):
        int8_gemv(torch.full((1, 64), -128, dtype=torch.int8), torch.ones(1), wq, torch.ones(5))


@pytest.mark.parametrize("m", [1, 4, 12])
@pytest.mark.parametrize("n,k", [(576, 576), (1536, 576), (576, 1536), (50, 70)])
def test_int8_linear_quantizes_rows_like_the_reference(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g) * 3
    x[0, :5] = torch.tensor([0.5, -0.5, 1.5, 2.5, 0.0]) * (x[0].abs().max() / 127)   # halves: round to even
    wq, ws = codes(n, k, seed=k), torch.rand(n, generator=g) + 0.01
    torch.testing.assert_close(kernels.int8_linear(x, wq, ws), reference.int8_linear(x, wq, ws), rtol=1e-5, atol=1e-4)
    zero = kernels.int8_linear(torch.zeros(1, k), wq, ws)
    assert torch.count_nonzero(zero) == 0


@pytest.mark.parametrize("m", [1, 3, 9])
@pytest.mark.parametrize("n,k", [(49152, 576), (100, 576), (37, 75)])   # the LM head; K not a multiple of 8
def test_weight_only_int8_matches_float64_within_float32_rounding(m, n, k):
    g = torch.Generator().manual_seed(n + m)
    x, wq, ws = torch.randn(m, k, generator=g), codes(n, k, seed=k), torch.rand(n, generator=g) * 0.01
    torch.testing.assert_close(kernels.int8_weight_gemv(x, wq, ws), reference.int8_weight_gemv(x, wq, ws),
                               rtol=1e-4, atol=1e-4)


def test_a_prepared_matrix_gives_the_same_products_and_checks_its_input():
    g = torch.Generator().manual_seed(9)
    wq, ws = codes(300, 576, seed=4), torch.rand(300, generator=g) + 0.01
    x = torch.randn(3, 576, generator=g)
    mat = kernels.Int8Matrix(wq, ws)
    torch.testing.assert_close(mat.linear(x), reference.int8_linear(x, wq, ws), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mat.weight_only(x), reference.int8_weight_gemv(x, wq, ws), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="576"):
        mat.linear(torch.randn(3, 575))
    with pytest.raises(ValueError, match="int8"):
        kernels.Int8Matrix(wq.float(), ws)
