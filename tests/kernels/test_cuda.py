"""The CUDA module: built wherever nvcc is (CI builds it), and on a GPU each kernel against the reference."""

from __future__ import annotations

import shutil

import pytest
import torch

import kernels
from kernels import PagedAttention, PagedDecode, reference
from kernels._loader import cuda_built, cuda_module
from tests.kernels.test_paged_attention import case, mixed_case

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_built()), reason="needs a CUDA GPU and _cuda")


def test_the_cuda_module_is_built_and_imports_where_nvcc_exists():
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on this machine: the CUDA module is not built here")
    assert cuda_built(), "nvcc is on the PATH but kernels._cuda was not built (see make install's CMake output)"
    assert cuda_module().device_count() >= 0           # imports and answers without a GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (9, 3), (32, 4)])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_cuda_paged_attention_matches_the_reference(block_size, head_dim, heads, kv_heads, batch):
    q, k, v, table, lens = case(batch, heads, kv_heads, head_dim, block_size, torch.float32, seed=batch)
    out = PagedDecode(table, lens, block_size)(q.cuda(), k.cuda(), v.cuda(), head_dim ** -0.5)
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), reference.paged_attention_decode(q, k, v, table, lens, head_dim ** -0.5,
                                                                            block_size), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (32, 4)])
def test_cuda_paged_attention_mixed_step_matches_the_reference(heads, kv_heads):
    q, k, v, table, lens, qlens = mixed_case(heads, kv_heads, 64, 16, torch.float32, seed=heads)
    out = PagedAttention(table, lens, 16, qlens)(q.cuda(), k.cuda(), v.cuda(), 0.125)
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), reference.paged_attention(q, k, v, table, lens, qlens, 0.125, 16),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_cuda_row_kernels_match_the_reference():
    g = torch.Generator().manual_seed(0)
    res, delta, weight = torch.randn(33, 576, generator=g), torch.randn(33, 576, generator=g), torch.rand(576, generator=g)
    res_gpu = res.cuda()
    out = kernels.add_rms_norm_(res_gpu, delta.cuda(), weight.cuda(), 1e-5)
    ref = reference.add_rms_norm_(res, delta, weight, 1e-5)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res_gpu.cpu(), res, atol=0, rtol=0)
    qkv = torch.randn(5, 960, generator=g)
    angles = torch.rand(5, 32, generator=g)
    gpu = kernels.rotary_(qkv.cuda(), 12, 64, angles.cos().cuda(), angles.sin().cuda())
    torch.testing.assert_close(gpu.cpu(), reference.rotary_(qkv.clone(), 12, 64, angles.cos(), angles.sin()),
                               atol=1e-6, rtol=1e-6)
    gate_up = torch.randn(9, 3072, generator=g)
    torch.testing.assert_close(kernels.silu_and_mul(gate_up.cuda()).cpu(), reference.silu_and_mul(gate_up),
                               atol=1e-5, rtol=1e-5)
