"""Triton kernels: residual-add + RMSNorm, rotary embedding in place, SiLU-and-mul, paged attention
(decodes, prefill chunks and verification rows; online softmax over each row's visible KV blocks). float32; see kernels.reference for the semantics."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import reference

# Triton decides when a kernel is defined whether it runs interpreted (on CPU tensors, the tests' way)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _add_rms_norm(res_ptr, delta_ptr, w_ptr, out_ptr, hidden, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    r = tl.load(res_ptr + row * hidden + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        r += tl.load(delta_ptr + row * hidden + cols, mask=mask, other=0.0)
        tl.store(res_ptr + row * hidden + cols, r, mask=mask)
    inv = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * hidden + cols, w * (r * inv), mask=mask)


@triton.jit
def _rotary(x_ptr, cos_ptr, sin_ptr, row_stride, heads, HALF: tl.constexpr, BLOCK: tl.constexpr):
    row, head = tl.program_id(0), tl.program_id(1)
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    base = x_ptr + row * row_stride + head * 2 * HALF
    x1 = tl.load(base + i, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + i, mask=mask, other=0.0)
    c = tl.load(cos_ptr + row * HALF + i, mask=mask, other=0.0)
    s = tl.load(sin_ptr + row * HALF + i, mask=mask, other=0.0)
    tl.store(base + i, x1 * c - x2 * s, mask=mask)
    tl.store(base + HALF + i, x2 * c + x1 * s, mask=mask)


@triton.jit
def _silu_and_mul(gu_ptr, out_ptr, inner, BLOCK: tl.constexpr):
    row, block = tl.program_id(0), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    g = tl.load(gu_ptr + row * 2 * inner + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * 2 * inner + inner + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * inner + cols, g / (1.0 + tl.exp(-g)) * u, mask=mask)


@triton.jit
def _paged_attention(q_ptr, k_ptr, v_ptr, table_ptr, row_seq_ptr, row_len_ptr, out_ptr, num_heads, group, num_slots,
                     max_blocks, scale, window, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     LOOP_BLOCKS: tl.constexpr):
    # one program per (query row, head); the row attends the first row_len positions of its sequence (window > 0:
    # the last `window` of them, from the block holding the first).
    # LOOP_BLOCKS 0 (compiled): the loop runs over the row's own blocks. Interpreted, a runtime scalar is a
    # 1-element array that range() cannot take with every numpy and Triton, so the loop runs over LOOP_BLOCKS
    # (the most blocks any row of the launch reads), the blocks outside the row masked out (they add nothing).
    row, head = tl.program_id(0), tl.program_id(1)
    seq = tl.load(row_seq_ptr + row)
    kvh = head // group
    d = tl.arange(0, HEAD_DIM)
    pos = tl.arange(0, BLOCK_SIZE)
    q = tl.load(q_ptr + (row * num_heads + head) * HEAD_DIM + d)
    length = tl.load(row_len_ptr + row)
    first = tl.maximum(length - window, 0) if window > 0 else length * 0
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((HEAD_DIM,), tl.float32)
    lo_blk = 0 if LOOP_BLOCKS else first // BLOCK_SIZE
    for blk in range(lo_blk, LOOP_BLOCKS if LOOP_BLOCKS else tl.cdiv(length, BLOCK_SIZE)):
        block_id = tl.load(table_ptr + seq * max_blocks + blk)
        p = blk * BLOCK_SIZE + pos
        valid = (p < length) & (p >= first)
        rows = kvh * num_slots + block_id * BLOCK_SIZE + pos
        k = tl.load(k_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)      # nothing seen yet: no rescaling, no weight
        alpha = tl.exp(m - m_safe)
        w = tl.exp(s - m_safe)
        v = tl.load(v_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * v, axis=0)
        total = total * alpha + tl.sum(w, axis=0)
        m = m_new
    out = tl.where(total > 0, acc / total, 0.0)
    tl.store(out_ptr + (row * num_heads + head) * HEAD_DIM + d, out)


def add_rms_norm_(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows, hidden = residual.shape
    out = torch.empty_like(residual)
    _add_rms_norm[(rows,)](residual, delta if delta is not None else residual, weight, out, hidden, eps,
                           HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(hidden))
    return out


def rotary_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = head_dim // 2
    _rotary[(x.shape[0], heads)](x, cos.contiguous(), sin.contiguous(), x.stride(0), heads, HALF=half,
                                 BLOCK=triton.next_power_of_2(half))
    return x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    rows, inner = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inner, dtype=gate_up.dtype, device=gate_up.device)
    block = 256
    _silu_and_mul[(rows, triton.cdiv(inner, block))](gate_up.contiguous(), out, inner, BLOCK=block)
    return out


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                    context_lens: torch.Tensor, query_lens: torch.Tensor | None, scale: float,
                    block_size: int, window: int = 0) -> torch.Tensor:
    """Decodes, prefill chunks and verification rows in one launch (semantics: kernels.reference.paged_attention)."""
    row_seq, row_len = reference.paged_rows(context_lens.cpu(), None if query_lens is None else query_lens.cpu())
    table, row_seq, row_len = (x.to(q.device) for x in (block_table.contiguous(), row_seq, row_len))
    return paged_attention_rows(q, k_pool, v_pool, table, row_seq, row_len, scale, block_size, window)


def paged_attention_rows(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                         row_seq: torch.Tensor, row_len: torch.Tensor, scale: float, block_size: int,
                         window: int = 0) -> torch.Tensor:
    """paged_attention with the per-row sequence and length already on q's device (PagedAttention.device_tables);
    window > 0: each row attends its last `window` positions, from the block holding the first of them."""
    t, h, d = q.shape
    kvh, num_slots, _ = k_pool.shape
    out = torch.empty_like(q)
    loop_blocks = triton.cdiv(int(row_len.max()), block_size) if INTERPRETED and t else 0
    _paged_attention[(t, h)](q.contiguous(), k_pool, v_pool, block_table, row_seq, row_len, out, h,
                             h // kvh, num_slots, block_table.shape[1], scale, window, HEAD_DIM=d,
                             BLOCK_SIZE=block_size, LOOP_BLOCKS=loop_blocks)
    return out


def paged_attention_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    return paged_attention(q, k_pool, v_pool, block_table, context_lens, None, scale, block_size)
