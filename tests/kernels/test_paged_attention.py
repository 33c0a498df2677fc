"""Paged attention: the C++ kernel against the pure-torch reference over block sizes, head dims, GQA
ratios, context lengths across block boundaries, batch sizes and KV dtypes, for decode steps and for
mixed steps (decodes, prefill chunks with and without cached context, speculative verification runs)."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import PagedAttention, PagedDecode, paged_attention, paged_attention_decode, reference

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels not built (make install)")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def case(batch: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, seed: int,
         lens: list[int] | None = None, shared_prefix: bool = False):
    """Random q and pools; each sequence gets its own blocks, scattered over the pool in random order
    (or, with shared_prefix, every sequence starts with the same blocks, as the prefix cache makes them)."""
    g = torch.Generator().manual_seed(seed)
    if lens is None:
        edges = [1, block_size - 1, block_size, block_size + 1, 3 * block_size, 300]
        lens = [edges[i % len(edges)] if i < len(edges) else int(torch.randint(1, 400, (1,), generator=g))
                for i in range(batch)]
    max_blocks = max(1, max(-(-n // block_size) for n in lens))
    num_blocks = batch * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)
    table = perm[:batch * max_blocks].view(batch, max_blocks).clone()
    if shared_prefix:
        table[:, : max_blocks // 2] = table[0, : max_blocks // 2]
    q = torch.randn(batch, heads, head_dim, generator=g).to(dtype)
    k_pool = torch.randn(kv_heads, num_blocks * block_size, head_dim, generator=g).to(dtype)
    v_pool = torch.randn(kv_heads, num_blocks * block_size, head_dim, generator=g).to(dtype)
    return q, k_pool, v_pool, table, torch.tensor(lens, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (9, 3), (32, 4)])        # GQA ratios 1, 3, 8
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_decode_matches_the_reference(dtype, block_size, head_dim, heads, kv_heads, batch):
    q, k, v, table, lens = case(batch, heads, kv_heads, head_dim, block_size, dtype, seed=batch + head_dim)
    scale = head_dim ** -0.5
    out = paged_attention_decode(q, k, v, table, lens, scale, block_size)
    ref = reference.paged_attention_decode(q, k, v, table, lens, scale, block_size)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 1, 64), (4, 2, 100)])   # G > 16; D not a multiple of 8
def test_the_scalar_path_matches_too(heads, kv_heads, head_dim):
    q, k, v, table, lens = case(5, heads, kv_heads, head_dim, 16, torch.float32, seed=3)
    out = paged_attention_decode(q, k, v, table, lens, 0.1, 16)
    torch.testing.assert_close(out, reference.paged_attention_decode(q, k, v, table, lens, 0.1, 16), **TOL[torch.float32])


def test_shared_prefix_blocks_and_an_empty_context():
    q, k, v, table, lens = case(6, 9, 3, 64, 16, torch.float32, seed=7, lens=[70, 70, 64, 0, 33, 80], shared_prefix=True)
    out = paged_attention_decode(q, k, v, table, lens, 0.125, 16)
    torch.testing.assert_close(out, reference.paged_attention_decode(q, k, v, table, lens, 0.125, 16), **TOL[torch.float32])
    assert torch.count_nonzero(out[3]) == 0


def test_one_plan_serves_every_layer():
    q, k, v, table, lens = case(4, 9, 3, 64, 16, torch.float32, seed=11)
    plan = PagedDecode(table, lens, 16)
    for layer in range(3):
        kl, vl = k * (layer + 1), v - layer
        torch.testing.assert_close(plan(q, kl, vl, 0.125),
                                   reference.paged_attention_decode(q, kl, vl, table, lens, 0.125, 16), **TOL[torch.float32])


def test_bad_inputs_are_refused_with_clear_errors():
    q, k, v, table, lens = case(2, 9, 3, 64, 16, torch.float32, seed=1, lens=[20, 5])
    with pytest.raises(ValueError, match="context lengths"):
        PagedDecode(table, torch.tensor([20, 10_000]), 16)
    with pytest.raises(TypeError, match="int64"):
        PagedDecode(table.int(), lens, 16)
    with pytest.raises(TypeError, match="k_pool and v_pool"):
        paged_attention_decode(q, k.half(), v.half(), table, lens, 0.1, 16)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_decode(q[:, :8], k, v, table, lens, 0.1, 16)
    with pytest.raises(ValueError, match="pool does not hold"):
        paged_attention_decode(q, k[:, :16], v[:, :16], table, lens, 0.1, 16)
    with pytest.raises(ValueError, match="sequences"):
        paged_attention_decode(q[:1], k, v, table, lens, 0.1, 16)


def test_the_reference_path_can_be_forced(monkeypatch):
    q, k, v, table, lens = case(3, 9, 3, 64, 16, torch.float32, seed=5)
    fast = paged_attention_decode(q, k, v, table, lens, 0.125, 16)
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    torch.testing.assert_close(paged_attention_decode(q, k, v, table, lens, 0.125, 16), fast, **TOL[torch.float32])


def mixed_case(heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, seed: int):
    """A step as the engine builds it: decodes, a first prefill chunk, later chunks over cached context,
    verification runs of k + 1 rows, and a sequence with no rows this step."""
    shapes = [(1, 1), (1, block_size), (block_size + 3, block_size + 3), (5, 2 * block_size + 7), (4, 4 * block_size),
              (0, 9), (1, 300), (37, 37), (6, block_size + 1), (2 * block_size, 5 * block_size - 1)]   # (rows, context)
    query_lens = [n for n, _ in shapes]
    q, k, v, table, lens = case(len(shapes), heads, kv_heads, head_dim, block_size, dtype, seed, lens=[c for _, c in shapes])
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(dtype)
    return q, k, v, table, lens, torch.tensor(query_lens, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (9, 3), (32, 4)])
def test_mixed_prefill_decode_and_verification_rows_match_the_reference(dtype, block_size, head_dim, heads, kv_heads):
    q, k, v, table, lens, qlens = mixed_case(heads, kv_heads, head_dim, block_size, dtype, seed=head_dim + heads)
    scale = head_dim ** -0.5
    out = paged_attention(q, k, v, table, lens, qlens, scale, block_size)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), reference.paged_attention(q, k, v, table, lens, qlens, scale, block_size).float(),
                               **TOL[dtype])


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 1, 64), (4, 2, 100)])
def test_mixed_steps_on_the_scalar_path(heads, kv_heads, head_dim):
    q, k, v, table, lens, qlens = mixed_case(heads, kv_heads, head_dim, 16, torch.float32, seed=4)
    torch.testing.assert_close(paged_attention(q, k, v, table, lens, qlens, 0.1, 16),
                               reference.paged_attention(q, k, v, table, lens, qlens, 0.1, 16), **TOL[torch.float32])


def test_the_reference_is_causal_attention_over_the_gathered_context():
    """The reference itself against torch's SDPA on the same sequence laid out contiguously: a chunk of n
    rows at the end of a context of L attends exactly the positions up to its own."""
    q, k, v, table, lens, qlens = mixed_case(9, 3, 64, 16, torch.float32, seed=8)
    ref = reference.paged_attention(q, k, v, table, lens, qlens, 0.125, 16)
    row = 0
    for s, (n, ctx) in enumerate(zip(qlens.tolist(), lens.tolist())):
        if n == 0:
            continue
        pos = torch.arange(ctx)
        slots = table[s, pos // 16] * 16 + pos % 16
        ks, vs = k[:, slots].unsqueeze(0), v[:, slots].unsqueeze(0)                    # [1, KVH, L, D]
        mask = pos[None, :] <= (ctx - n + torch.arange(n))[:, None]
        expect = torch.nn.functional.scaled_dot_product_attention(
            q[row:row + n].transpose(0, 1).unsqueeze(0), ks, vs, attn_mask=mask, scale=0.125, enable_gqa=True)
        torch.testing.assert_close(ref[row:row + n], expect.squeeze(0).transpose(0, 1), atol=1e-5, rtol=1e-5)
        row += n


def test_a_mixed_plan_serves_every_layer_and_reports_its_rows():
    q, k, v, table, lens, qlens = mixed_case(9, 3, 64, 16, torch.float32, seed=12)
    plan = PagedAttention(table, lens, 16, qlens)
    for layer in range(2):
        kl = k * (layer + 1)
        torch.testing.assert_close(plan(q, kl, v, 0.125),
                                   reference.paged_attention(q, kl, v, table, lens, qlens, 0.125, 16), **TOL[torch.float32])
    seq, seen = plan.rows()
    assert seq.tolist()[:3] == [0, 1, 2] and seen.tolist()[:2] == [1, 16]
    assert seen[qlens[:2].sum():qlens[:3].sum()].tolist() == list(range(1, 20))       # a first chunk: causal


def test_bad_query_lengths_are_refused():
    q, k, v, table, lens = case(2, 9, 3, 64, 16, torch.float32, seed=1, lens=[20, 5])
    with pytest.raises(ValueError, match="query lengths"):
        PagedAttention(table, lens, 16, torch.tensor([3, 6]))
    with pytest.raises(ValueError, match="query_lens"):
        PagedAttention(table, lens, 16, torch.tensor([3]))
    with pytest.raises(ValueError, match="rows"):
        PagedAttention(table, lens, 16, torch.tensor([3, 2]))(q, k, v, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache_writes_strided_qkv_rows_into_their_slots(dtype):
    g = torch.Generator().manual_seed(2)
    t, kvh, d, slots = 7, 3, 64, 64
    qkv = torch.randn(t, 9 * d + 2 * kvh * d, generator=g).to(dtype)
    k = qkv[:, 9 * d:9 * d + kvh * d].view(t, kvh, d)
    v = qkv[:, 9 * d + kvh * d:].view(t, kvh, d)
    slot_mapping = torch.randperm(slots, generator=g)[:t]
    pools = [torch.zeros(kvh, slots, d, dtype=dtype) for _ in range(4)]
    kernels.reshape_and_cache(k, v, pools[0], pools[1], slot_mapping)
    reference.reshape_and_cache(k, v, pools[2], pools[3], slot_mapping)
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])
    with pytest.raises(ValueError, match="outside the pool"):
        kernels.reshape_and_cache(k, v, pools[0], pools[1], slot_mapping + slots)


def test_a_plan_from_lists_equals_the_plan_from_tensors():
    """The engine builds its step's plan from Python lists (PagedAttention.from_lists): the same tables,
    lengths, row starts and block range as the tensor constructor, and the same refusals."""
    tables, ctx, qlens = [[4, 9, 2], [7], [3, 5]], [40, 3, 17], [1, 3, 5]
    padded = torch.tensor([t + [0] * (3 - len(t)) for t in tables])
    a = PagedAttention.from_lists(tables, ctx, 16, qlens)
    b = PagedAttention(padded, torch.tensor(ctx), 16, torch.tensor(qlens))
    for name in ("block_table", "context_lens", "query_lens", "query_start"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.num_rows, a.max_context, a.max_block, a.min_block) == (b.num_rows, b.max_context, b.max_block, b.min_block)
    with pytest.raises(ValueError, match="context lengths"):
        PagedAttention.from_lists([[1]], [17], 16, [1])
    with pytest.raises(ValueError, match="query lengths"):
        PagedAttention.from_lists([[1]], [2], 16, [3])


def poison_before_windows(table: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
                          qlens: torch.Tensor, window: int, block_size: int):
    """The engine's picture of a sliding-window group: blocks wholly before each sequence's first row's window
    have gone back to the pool, their entries the null block. Here that block holds NaN, so reading it (even
    masked, 0 x NaN) would show in the output."""
    k, v, table = k.clone(), v.clone(), table.clone()
    k = torch.cat([k, torch.full_like(k[:, :block_size], float("nan"))], dim=1)
    v = torch.cat([v, torch.full_like(v[:, :block_size], float("nan"))], dim=1)
    null = k.shape[1] // block_size - 1
    for s, (ctx, n) in enumerate(zip(lens.tolist(), qlens.tolist())):
        first = max(0, ctx - n + 1 - window)
        table[s, : first // block_size] = null
    return table, k, v


@pytest.mark.parametrize("window", [1, 15, 16, 39, 100, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 1, 256), (32, 1, 64)])   # the last: scalar
def test_a_sliding_window_reads_only_its_positions(window, dtype, heads, kv_heads, head_dim):
    q, k, v, table, lens, qlens = mixed_case(heads, kv_heads, head_dim, 16, dtype, seed=window)
    table, k, v = poison_before_windows(table, k, v, lens, qlens, window, 16)
    out = PagedAttention(table, lens, 16, qlens, window=window)(q, k, v, 0.1)
    ref = reference.paged_attention(q, k, v, table, lens, qlens, 0.1, 16, window=window)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    if window < 300:                     # the window changes the answer where contexts are longer
        assert not torch.allclose(out.float(), paged_attention(q, k.nan_to_num(), v.nan_to_num(), table, lens, qlens,
                                                               0.1, 16).float(), atol=1e-3)


def test_the_windowed_reference_is_sdpa_with_a_band_mask():
    q, k, v, table, lens, qlens = mixed_case(9, 3, 64, 16, torch.float32, seed=11)
    window = 20
    ref = reference.paged_attention(q, k, v, table, lens, qlens, 0.125, 16, window=window)
    row = 0
    for s, (n, ctx) in enumerate(zip(qlens.tolist(), lens.tolist())):
        if n == 0:
            continue
        pos = torch.arange(ctx)
        slots = table[s, pos // 16] * 16 + pos % 16
        own = torch.arange(ctx - n, ctx)[:, None]
        band = (pos[None, :] <= own) & (pos[None, :] > own - window)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[row:row + n].transpose(0, 1)[None], k[:, slots][None], v[:, slots][None], attn_mask=band, scale=0.125,
            enable_gqa=True)[0].transpose(0, 1)
        torch.testing.assert_close(ref[row:row + n], want, atol=1e-5, rtol=1e-5)
        row += n
