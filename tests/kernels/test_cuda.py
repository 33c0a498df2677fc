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


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (128, 32, 8), (64, 8, 8), (128, 4, 2)])
def test_cuda_paged_attention_long_contexts_split_across_partitions(block_size, head_dim, heads, kv_heads):
    # lengths around the split-K partition sizes (32..256 positions) and far past them, so rows combine
    # several partitions through the reduce kernel, next to rows that fit one
    lens = [1, 31, 32, 33, 255, 256, 257, 1000, 2049, 4100]
    q, k, v, table, ctx = case(len(lens), heads, kv_heads, head_dim, block_size, torch.float32, seed=head_dim + heads,
                               lens=lens)
    plan = PagedDecode(table, ctx, block_size)
    out = plan(q.cuda(), k.cuda(), v.cuda(), head_dim ** -0.5)
    assert cuda_module().paged_attention_fast(heads, kv_heads, head_dim, int(ctx.max()))
    torch.testing.assert_close(out.cpu(), reference.paged_attention_decode(q, k, v, table, ctx, head_dim ** -0.5,
                                                                            block_size), atol=1e-4, rtol=1e-4)
    # one long row alone: every block of the grid but one partition's exits, the rest reduce
    one = PagedDecode(table[-1:], ctx[-1:], block_size)(q[-1:].cuda(), k.cuda(), v.cuda(), head_dim ** -0.5)
    torch.testing.assert_close(one.cpu(), out[-1:].cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(32, 4, 2), (64, 16, 1), (80, 6, 3)])
def test_cuda_paged_attention_general_kernel_for_other_shapes(head_dim, heads, kv_heads):
    # head dims other than 64/128 and groups over 8 run the general kernel
    assert not cuda_module().paged_attention_fast(heads, kv_heads, head_dim, 512)
    q, k, v, table, lens = case(6, heads, kv_heads, head_dim, 16, torch.float32, seed=head_dim)
    out = PagedDecode(table, lens, 16)(q.cuda(), k.cuda(), v.cuda(), head_dim ** -0.5)
    torch.testing.assert_close(out.cpu(), reference.paged_attention_decode(q, k, v, table, lens, head_dim ** -0.5, 16),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_cuda_paged_attention_unaligned_q_takes_the_general_kernel():
    q, k, v, table, lens = case(5, 9, 3, 64, 16, torch.float32, seed=3)
    flat = torch.empty(q.numel() + 1, device="cuda")
    q_odd = flat[1:].view_as(q)                          # 4-byte offset: not 16-byte aligned
    q_odd.copy_(q.cuda())
    out = PagedDecode(table, lens, 16)(q_odd, k.cuda(), v.cuda(), 0.125)
    torch.testing.assert_close(out.cpu(), reference.paged_attention_decode(q, k, v, table, lens, 0.125, 16),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_reshape_and_cache_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(7, 9 * 64 + 2 * 3 * 64, generator=g).to(dtype)
    k, v = qkv[:, 576:768].view(7, 3, 64), qkv[:, 768:].view(7, 3, 64)   # strided views of a fused output
    slots = torch.tensor([5, 0, 17, 63, 32, 1, 40])
    k_ref, v_ref = torch.randn(3, 64, 64, generator=g).to(dtype), torch.randn(3, 64, 64, generator=g).to(dtype)
    k_gpu, v_gpu = k_ref.cuda(), v_ref.cuda()
    qkv_gpu = qkv.cuda()
    kernels.reshape_and_cache(qkv_gpu[:, 576:768].view(7, 3, 64), qkv_gpu[:, 768:].view(7, 3, 64), k_gpu, v_gpu,
                              slots.cuda())
    reference.reshape_and_cache(k, v, k_ref, v_ref, slots)
    torch.cuda.synchronize()
    assert torch.equal(k_gpu.cpu(), k_ref) and torch.equal(v_gpu.cpu(), v_ref)
