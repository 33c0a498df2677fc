"""The Triton kernels against the references, on CPU tensors under TRITON_INTERPRET=1 (small shapes). On a
GPU machine, `TRITON_INTERPRET=0 pytest tests/kernels/test_triton.py` runs the same tests compiled, on the GPU
(they are the GPU path where the CUDA module is not built, or with STRATA_KERNELS=triton)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")        # before the kernels are defined
triton_kernels = pytest.importorskip("kernels.triton", reason="triton is installed by make install (test extra)")
COMPILED = os.environ["TRITON_INTERPRET"] != "1"
DEVICE = "cuda" if COMPILED else "cpu"
if COMPILED and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 compiles the kernels for a GPU, and there is none", allow_module_level=True)


def on(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]

from kernels import reference  # noqa: E402
from tests.kernels.test_paged_attention import case, mixed_case, poison_before_windows  # noqa: E402


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (9, 3), (16, 2)])
def test_triton_paged_attention_decode(block_size, head_dim, heads, kv_heads):
    q, k, v, table, lens = case(3, heads, kv_heads, head_dim, block_size, torch.float32, seed=head_dim,
                                lens=[1, block_size + 1, 2 * block_size])
    out = triton_kernels.paged_attention_decode(*on(q, k, v), table, lens, head_dim ** -0.5, block_size).cpu()
    torch.testing.assert_close(out, reference.paged_attention_decode(q, k, v, table, lens, head_dim ** -0.5, block_size),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (8, 1)])
def test_triton_paged_attention_mixed_step(heads, kv_heads):
    q, k, v, table, lens, qlens = mixed_case(heads, kv_heads, 64, 16, torch.float32, seed=heads)
    keep = [0, 2, 3, 5, 7]                      # decode, first chunk, chunk over context, empty, 37-row chunk
    rows = torch.cat([torch.arange(int(qlens[:i].sum()), int(qlens[:i + 1].sum())) for i in keep])
    q, table, lens, qlens = q[rows], table[keep], lens[keep], qlens[keep]
    out = triton_kernels.paged_attention(*on(q, k, v), table, lens, qlens, 0.125, 16).cpu()
    torch.testing.assert_close(out, reference.paged_attention(q, k, v, table, lens, qlens, 0.125, 16), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [1, 20])
def test_triton_paged_attention_sliding_window(window):
    """Each row attends its last `window` positions; the blocks before the first row's window hold NaN (the
    engine's released blocks) and are never read. Two mixed batches rather than one: under TRITON_INTERPRET
    every program of a batch walks its longest row and context (one batch of all four: 30 s, these two: 12 s)."""
    for keep in ([0, 3, 6], [3, 7]):            # decode, chunk over context, decode at 300; and a 37-row chunk
        q, k, v, table, lens, qlens = mixed_case(9, 3, 64, 16, torch.float32, seed=window)
        rows = torch.cat([torch.arange(int(qlens[:i].sum()), int(qlens[:i + 1].sum())) for i in keep])
        q, table, lens, qlens = q[rows], table[keep], lens[keep], qlens[keep]
        table, k, v = poison_before_windows(table, k, v, lens, qlens, window, 16)
        out = triton_kernels.paged_attention(*on(q, k, v), table, lens, qlens, 0.125, 16, window).cpu()
        assert not out.isnan().any()
        torch.testing.assert_close(out, reference.paged_attention(q, k, v, table, lens, qlens, 0.125, 16, window),
                                   atol=1e-4, rtol=1e-4)


def test_triton_row_kernels():
    g = torch.Generator().manual_seed(0)
    res, delta, weight = torch.randn(3, 576, generator=g), torch.randn(3, 576, generator=g), torch.rand(576, generator=g)
    res_ref = res.clone()
    res_dev, delta_dev, weight_dev = on(res, delta, weight)
    out = triton_kernels.add_rms_norm_(res_dev, delta_dev, weight_dev, 1e-5).cpu()
    torch.testing.assert_close(out, reference.add_rms_norm_(res_ref, delta, weight, 1e-5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res_dev.cpu(), res_ref)
    qkv = torch.randn(2, 960 + 3, generator=g)[:, :960]
    angles = torch.rand(2, 32, generator=g)
    expect = reference.rotary_(qkv.clone(), 12, 64, angles.cos(), angles.sin())
    qkv_dev = torch.randn(2, 960 + 3, device=DEVICE)[:, :960]
    qkv_dev.copy_(qkv)
    rotated = triton_kernels.rotary_(qkv_dev, 12, 64, *on(angles.cos(), angles.sin())).cpu()
    torch.testing.assert_close(rotated, expect, atol=1e-6, rtol=1e-6)
    gate_up = torch.randn(2, 600, generator=g)
    torch.testing.assert_close(triton_kernels.silu_and_mul(*on(gate_up)).cpu(), reference.silu_and_mul(gate_up),
                               atol=1e-6, rtol=1e-5)
