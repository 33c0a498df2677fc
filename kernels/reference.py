"""Pure-torch references for every kernel: the tests compare against these, and STRATA_KERNELS=reference
runs them instead of the compiled kernels. Imports nothing of kernels, so every kernel module may use it
(paged_rows: the per-row tables the paged-attention kernels read)."""

from __future__ import annotations

import torch


def cosine_topk(rows: torch.Tensor, parts: torch.Tensor, queries: torch.Tensor, query_parts: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k dot products of each query with the rows of its own partition, best first (ties: lower row).
    Missing slots: row -1, score -inf. rows [n, d], parts [n], queries [m, d], query_parts [m]."""
    m, n = queries.shape[0], rows.shape[0]
    out_rows = torch.full((m, k), -1, dtype=torch.int64)
    out_scores = torch.full((m, k), float("-inf"), dtype=torch.float32)
    if n == 0 or k == 0:
        return out_rows, out_scores
    scores = (queries.float() @ rows.float().T).masked_fill(parts[None, :] != query_parts[:, None], float("-inf"))
    for j in range(m):
        # stable sort on -score keeps lower rows first among equal scores
        order = torch.sort(-scores[j], stable=True).indices[:k]
        keep = order[torch.isfinite(scores[j, order])]
        out_rows[j, :len(keep)] = keep
        out_scores[j, :len(keep)] = scores[j, keep]
    return out_rows, out_scores


def quantize_rows_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: rows ≈ scale * codes, codes in [-127, 127]; err = ||row - scale * codes||."""
    rows = rows.float()
    amax = rows.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(rows / scale[:, None]).clamp(-127, 127)
    err = (rows.double() - scale.double()[:, None] * codes.double()).norm(dim=1)
    return codes.to(torch.int8), scale, err.float()


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                    context_lens: torch.Tensor, query_lens: torch.Tensor | None, scale: float,
                    block_size: int, window: int = 0) -> torch.Tensor:
    """Causal attention of each sequence's query rows over its paged K/V, computed in float32.

    q [T, H, D]: sequence s owns the next query_lens[s] rows (None: one each), the last positions of its
    context: row r of n sits at position context_lens[s] - n + r and attends positions 0 .. that one.
    k_pool / v_pool [KVH, num_slots, D]; block_table [S, max_blocks] int64 (position p of sequence s lives
    in slot block_table[s, p // block_size] * block_size + p % block_size); context_lens [S] int64. Query
    head h uses KV head h // (H // KVH). window > 0 (sliding-window layers): a row at position P attends
    P - window + 1 .. P only. Returns [T, H, D] in q's dtype."""
    t, h, d = q.shape
    kvh = k_pool.shape[0]
    out = torch.zeros(t, h, d, dtype=torch.float32, device=q.device)
    row = 0
    for s in range(block_table.shape[0]):
        ctx = int(context_lens[s])
        n = 1 if query_lens is None else int(query_lens[s])
        if n == 0:
            continue
        first = max(0, ctx - n + 1 - window) if window > 0 else 0      # blocks before it may be released
        pos = torch.arange(first, ctx, device=block_table.device)
        slots = (block_table[s, pos // block_size] * block_size + pos % block_size).to(k_pool.device)
        pos = pos.to(q.device)
        k, v = k_pool[:, slots].float(), v_pool[:, slots].float()               # [KVH, L, D]
        qs = q[row:row + n].float().view(n, kvh, h // kvh, d).permute(1, 0, 2, 3)  # [KVH, n, G, D]
        scores = torch.einsum("knqd,kld->knql", qs, k) * scale
        own = (ctx - n + torch.arange(n, device=q.device))[:, None]                                  # [n, 1]
        visible = pos[None, :] <= own                                                                # [n, L]
        if window > 0:
            visible &= pos[None, :] > own - window
        scores = scores.masked_fill(~visible[None, :, None, :], float("-inf"))
        out[row:row + n] = torch.einsum("knql,kld->nkqd", torch.softmax(scores, dim=-1), v).reshape(n, h, d)
        row += n
    return out.to(q.dtype)


def paged_rows(context_lens: torch.Tensor, query_lens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """paged_attention's query rows as tables: per row, its sequence and how many positions it attends (its
    own position + 1), [T] int64 each (query_lens None: one row per sequence)."""
    if query_lens is None:
        query_lens = torch.ones_like(context_lens)
    seq = torch.repeat_interleave(torch.arange(len(query_lens)), query_lens)
    first_row = torch.cumsum(query_lens, 0) - query_lens
    offset = torch.arange(len(seq)) - first_row[seq]
    return seq, context_lens[seq] - query_lens[seq] + offset + 1


def paged_attention_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    """One query row per sequence (a decode step): paged_attention with query_lens None."""
    return paged_attention(q, k_pool, v_pool, block_table, context_lens, None, scale, block_size)


def _q6k_fields(blocks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q6_K super-blocks (ql 128, qh 64, int8 scales 16, fp16 d: 210 bytes a 256 weights) → codes q - 32
    [N, K/16, 16], scales [N, K/16] and d [N, K/256, 1] (float32; ggml's order: per half of 128, value r's low
    4 bits in ql[r % 64], low nibble for r < 64; its high 2 in qh[r % 32] at bit 2 * (r // 32))."""
    n = blocks.shape[0]
    raw = blocks.reshape(n, k // 256, 210)
    ql = raw[..., :128].reshape(n, -1, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).view(2, 1)
    qh = raw[..., 128:192].reshape(n, -1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    q6 = (ql & 15).reshape(n, -1, 2, 128) | ((qh & 3).reshape(n, -1, 2, 128) << 4)
    sc = raw[..., 192:208].contiguous().view(torch.int8).float().reshape(n, k // 16)
    d = raw[..., 208:210].contiguous().view(torch.float16).float()
    return q6.reshape(n, k // 16, 16).float() - 32, sc, d


def _q4k_fields(blocks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks (fp16 d, dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles: 144 a 256 weights)
    → codes [N, K/32, 32], d * sc and -(dmin * m) [N, K/32] (float32, as ggml computes them)."""
    n, nb = blocks.shape[0], k // 32
    raw = blocks.reshape(n, k // 256, 144)
    sd = raw[..., 0:2].contiguous().view(torch.float16).float()                      # [N, nsb, 1]
    smin = raw[..., 2:4].contiguous().view(torch.float16).float()
    p = raw[..., 4:16]
    sc = torch.cat([p[..., 0:4] & 0x3F, (p[..., 8:12] & 0x0F) | ((p[..., 0:4] >> 2) & 0x30)], dim=-1)
    mn = torch.cat([p[..., 4:8] & 0x3F, (p[..., 8:12] >> 4) | ((p[..., 4:8] >> 2) & 0x30)], dim=-1)
    chunks = raw[..., 16:].reshape(n, k // 256, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).view(2, 1)
    q = (chunks & 15).reshape(n, nb, 32).float()
    return q, (sd * sc.float()).reshape(n, nb), -(smin * mn.float()).reshape(n, nb)


def _gguf_fields(blocks: torch.Tensor, block_type: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks uint8 [N, K/32 * bytes] → codes [N, K/32, 32] (float), d and m [N, K/32] (float32; m = 0 for Q8_0,
    Q5_0 and Q6_K: Q5_0's codes are its 5-bit ones - 16, Q6_K's its scale * (6-bit code - 32), d its
    super-block's)."""
    n, nb = blocks.shape[0], k // 32
    if block_type == "Q4_K":
        return _q4k_fields(blocks, k)
    if block_type == "Q6_K":
        q6, sc, sd = _q6k_fields(blocks, k)
        d = sd.expand(n, k // 256, 8).reshape(n, nb)
        return (q6 * sc[..., None]).reshape(n, nb, 32), d, torch.zeros_like(d)          # exact integers
    raw = blocks.reshape(n, nb, -1)
    d = raw[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    if block_type == "Q4_1":
        m = raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        qs = raw[..., 4:20]
        q = torch.cat([qs & 15, qs >> 4], dim=-1).float()
    elif block_type == "Q8_0":
        m = torch.zeros_like(d)
        q = raw[..., 2:34].contiguous().view(torch.int8).float()
    elif block_type == "Q5_0":                      # weight = d * (q - 16), q's fifth bit j in qh's bit j
        m = torch.zeros_like(d)
        qs, qh = raw[..., 6:22], raw[..., 2:6].flatten().clone().view(torch.int32).view(n, nb, 1)
        high = (qh >> torch.arange(32, dtype=torch.int32)) & 1
        q = (torch.cat([qs & 15, qs >> 4], dim=-1).int() | (high << 4)).float() - 16
    else:
        raise ValueError(f"unsupported block type {block_type!r}")
    return q, d, m


def gguf_dequantize(blocks: torch.Tensor, block_type: str, k: int) -> torch.Tensor:
    """GGUF Q4_1 / Q8_0 / Q5_0 / Q4_K / Q6_K blocks [N, K/32 * bytes] → float32 [N, K]: d * q + m per weight
    (ggml's order; Q6_K: (d * sc) * (q - 32))."""
    if block_type == "Q6_K":
        q6, sc, sd = _q6k_fields(blocks, k)
        n = blocks.shape[0]
        return ((sd.expand(n, k // 256, 16).reshape(n, k // 16) * sc)[..., None] * q6).reshape(n, k)
    q, d, m = _gguf_fields(blocks, block_type, k)
    return (q * d[..., None] + m[..., None]).reshape(blocks.shape[0], k)


def quantize_blocks_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 → int8-range codes [M, K/32, 32] (round half to even of x * (127 / max|x|)), the
    scales dx = max|x| / 127 and the quantized blocks' sums sx = dx * sum(codes), both [M, K/32] (codes 0
    where a block is all zero)."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    codes, dx = torch.round(xb * inv[..., None]), amax / 127.0
    return codes, dx, dx * codes.sum(dim=-1)


def gguf_gemv(x: torch.Tensor, blocks: torch.Tensor, block_type: str, k: int) -> torch.Tensor:
    """y [M, N] = sum over blocks b of d[n, b] * dx[r, b] * (codes_w · codes_x) (+ m[n, b] * sx[r, b] for Q4_1):
    the kernel's arithmetic (activations quantized to int8 per 32-value block), integer dots exact in float64."""
    q, d, m = _gguf_fields(blocks, block_type, k)
    xq, dx, sx = quantize_blocks_q8(x)
    dots = torch.einsum("rbi,nbi->rnb", xq.double(), q.double())                 # exact integers
    y = (dots * (d[None].double() * dx[:, None].double())).sum(-1) + (m[None].double() * sx[:, None].double()).sum(-1)
    return y.float()


def int8_gemv(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """y [M, N] = x_scale[:, None] * w_scale[None, :] * (xq [M, K] int8 @ wq [N, K] int8ᵀ), the integer
    products summed exactly."""
    return (xq.long() @ wq.long().t()).float() * x_scale[:, None] * w_scale[None, :]


def int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Rows of x [M, K] float32 quantized per row (scale = max|x| / 127, round half to even), then int8_gemv."""
    x_scale = x.abs().amax(dim=1).clamp_min(1e-8) / 127.0
    xq = torch.round(x / x_scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return int8_gemv(xq, x_scale, wq, w_scale)


def int8_weight_gemv(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Weight-only int8: x [M, K] float32 @ (wq [N, K] * w_scale[:, None])ᵀ."""
    return (x.double() @ wq.double().t() * w_scale.double()[None, :]).float()


def add_rms_norm_(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += delta in place (when given); returns weight * residual / sqrt(mean(residual²) + eps)."""
    if delta is not None:
        residual.add_(delta)
    xf = residual.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(residual.dtype)


def rotary_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding in place on the first `heads` heads of each row of x [T, W]."""
    half = head_dim // 2
    v = x[:, :heads * head_dim].unflatten(1, (heads, head_dim))
    x1, x2 = v[..., :half].clone(), v[..., half:].clone()
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    v[..., :half] = x1 * c - x2 * s
    v[..., half:] = x2 * c + x1 * s
    return x


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] → gelu(gate_up[:, :I], approximate="tanh") * gate_up[:, I:] (Gemma's MLP)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] → silu(gate_up[:, :I]) * gate_up[:, I:]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """k/v [T, KVH, D] into the pools [KVH, num_slots, D] at slot_mapping [T]."""
    k_pool.index_copy_(1, slot_mapping, k.transpose(0, 1).to(k_pool.dtype))
    v_pool.index_copy_(1, slot_mapping, v.transpose(0, 1).to(v_pool.dtype))
