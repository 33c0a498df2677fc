"""Fused residual-add + RMSNorm, in-place rotary embedding and SiLU-and-mul against the torch reference."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import add_rms_norm_, reference, rotary_

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels not built (make install)")


@pytest.mark.parametrize("rows", [1, 7, 300])                 # 300 x 576: the threaded path
@pytest.mark.parametrize("hidden", [64, 576, 100])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_the_reference(rows, hidden, with_delta):
    g = torch.Generator().manual_seed(rows * hidden)
    res = torch.randn(rows, hidden, generator=g) * 3
    delta = torch.randn(rows, hidden, generator=g) if with_delta else None
    weight = torch.rand(hidden, generator=g) + 0.5
    res_ref = res.clone()
    out = add_rms_norm_(res, delta, weight, 1e-5)
    ref = reference.add_rms_norm_(res_ref, delta, weight, 1e-5)
    torch.testing.assert_close(res, res_ref, rtol=0, atol=0)          # the residual sum is the same float op
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 600])
@pytest.mark.parametrize("heads,head_dim,width", [(12, 64, 960), (8, 128, 1024), (3, 64, 192)])
def test_rotary_rotates_the_leading_heads_of_strided_rows_in_place(rows, heads, head_dim, width):
    g = torch.Generator().manual_seed(rows + heads)
    qkv = torch.randn(rows, width + 7, generator=g)[:, :width]        # strided rows, as a QKV slice
    angles = torch.rand(rows, head_dim // 2, generator=g) * 6.28
    cos, sin = angles.cos(), angles.sin()
    expect = reference.rotary_(qkv.clone(), heads, head_dim, cos, sin)
    before = qkv.clone()
    out = rotary_(qkv, heads, head_dim, cos, sin)
    assert out.data_ptr() == qkv.data_ptr()
    torch.testing.assert_close(qkv, expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv[:, heads * head_dim:], before[:, heads * head_dim:], rtol=0, atol=0)


def test_rotary_of_position_zero_is_the_identity_and_bad_shapes_are_refused():
    x = torch.randn(2, 128)
    before = x.clone()
    rotary_(x, 2, 64, torch.ones(2, 32), torch.zeros(2, 32))
    torch.testing.assert_close(x, before)
    with pytest.raises(ValueError, match="cos and sin"):
        rotary_(x, 2, 64, torch.ones(3, 32), torch.zeros(3, 32))
    with pytest.raises(ValueError, match="heads"):
        rotary_(x, 3, 64, torch.ones(2, 32), torch.zeros(2, 32))
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm_(torch.randn(2, 8), None, torch.ones(7), 1e-5)


@pytest.mark.parametrize("rows", [1, 9, 200])
@pytest.mark.parametrize("inner", [1536, 100])
def test_gelu_tanh_and_mul_matches_torch(rows, inner):
    """Gemma's GELU (tanh form) as x * sigmoid(2y) from exp: within 1e-5 of torch's (whose 1 + tanh(y) loses
    digits below x = -3, where ours keeps them)."""
    gate_up = torch.randn(rows, 2 * inner, generator=torch.Generator().manual_seed(rows)) * 4
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 60.0, -60.0])
    torch.testing.assert_close(kernels.gelu_tanh_and_mul(gate_up), reference.gelu_tanh_and_mul(gate_up),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2I"):
        kernels.gelu_tanh_and_mul(torch.randn(2, 7))


@pytest.mark.parametrize("rows", [1, 9, 200])
@pytest.mark.parametrize("inner", [1536, 100])
def test_silu_and_mul_matches_the_reference(rows, inner):
    gate_up = torch.randn(rows, 2 * inner, generator=torch.Generator().manual_seed(rows)) * 4
    torch.testing.assert_close(kernels.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2I"):
        kernels.silu_and_mul(torch.randn(2, 7))
